"""The MegEngine recipe's schedule: iterations per epoch, learning rate per iteration, the optimizer.

An "epoch" is ``cfg.nr_images_epoch`` images, so the iteration count depends on the global batch
(images per step over all ranks); the learning rate scales with it (``cfg.basic_lr`` is per image).
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from atssdet.config import ATSSConfig


def iters_per_epoch(cfg: ATSSConfig, global_batch: int) -> int:
    """MegEngine's ``tot_step = nr_images_epoch // global batch`` (at least 1)."""
    return max(1, cfg.nr_images_epoch // global_batch)


def total_iterations(cfg: ATSSConfig, global_batch: int) -> int:
    """``max_epoch`` epochs of ``nr_images_epoch`` images."""
    return cfg.max_epoch * iters_per_epoch(cfg, global_batch)


def learning_rate(cfg: ATSSConfig, iteration: int, *, global_batch: int) -> float:
    """Learning rate of (0-based) ``iteration``: MegEngine ``adjust_learning_rate``.

    ``basic_lr * global_batch * lr_decay_rate ** (number of decay stages <= epoch)``, times
    ``(iteration + 1) / warm_iters`` during the first ``warm_iters`` iterations of epoch 0.
    ``cfg.lr_schedule == "cosine"`` (the CPU demo preset) replaces the step decay by
    ``0.5 * (1 + cos(pi * iteration / total_iterations))``.
    """
    epoch = iteration // iters_per_epoch(cfg, global_batch)
    if cfg.lr_schedule == "cosine":  # atssdet demo preset: half a cosine from basic_lr to 0 over max_epoch
        progress = min(1.0, iteration / total_iterations(cfg, global_batch))
        lr = cfg.basic_lr * global_batch * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.lr_schedule == "step":
        lr = (
            cfg.basic_lr * global_batch * cfg.lr_decay_rate ** bisect.bisect_right(cfg.lr_decay_stages, epoch)
        )
    else:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r} (expected step or cosine)")
    if epoch == 0 and iteration < cfg.warm_iters:
        lr *= (iteration + 1.0) / cfg.warm_iters
    return lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``; returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def build_optimizer(cfg: ATSSConfig, params: list[nn.Parameter], *, lr: float) -> torch.optim.Optimizer:
    """``cfg.optimizer``: SGD (momentum ``cfg.momentum``, the MegEngine recipe) or AdamW (the CPU demo preset,
    which trains from scratch in minutes); both with ``cfg.weight_decay`` on every parameter."""
    if cfg.optimizer == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected SGD or AdamW)")

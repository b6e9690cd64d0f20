"""One optimisation step: forward, :func:`atssdet.criterion.atss_loss`, the losses averaged over ranks,
a stop on a non-finite loss, backward and the optimizer step (through the GradScaler under fp16 AMP).

On a GPU the step reads device values on the host exactly once: the ``.tolist()`` of the averaged
losses, which the log and the non-finite check need (``tests/test_device_guard.py`` holds it to that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from atssdet import distributed
from atssdet.config import ATSSConfig
from atssdet.criterion import LOSS_KEYS, atss_loss
from atssdet.data.collate import DetectionBatch
from atssdet.training.checkpoint import TrainingState
from atssdet.training.device import DeviceOptions
from atssdet.training.result import TrainingError


@dataclass(frozen=True)
class StepResult:
    losses: dict[str, float]  # LOSS_KEYS -> the mean over ranks of this step's loss
    num_bad: int  # unreadable images skipped in this step, over all ranks


def _inputs(
    batch: DetectionBatch | None, device: torch.device
) -> tuple[Tensor, list[dict[str, Tensor]], list[int]]:
    """``(images [N, 3, H, W] on device, targets on the host, image ids)``. Targets stay where the loader
    put them (pinned memory on CUDA): :func:`~atssdet.criterion.atss_loss` checks them on the host and
    copies them over padded, in one go. For ``None`` (every image of this rank's batch was unreadable)
    one blank 32 x 32 image without objects, so that DDP's collectives stay in step."""
    if batch is None:
        empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long)}
        return torch.zeros((1, 3, 32, 32), device=device), [empty], []
    targets = [{"boxes": t.boxes, "labels": t.labels} for t in batch.targets]
    return batch.images.to(device, non_blocking=True), targets, list(batch.image_ids)


def train_step(
    net: nn.Module,
    batch: DetectionBatch | None,
    bad: list[str],
    cfg: ATSSConfig,
    run: TrainingState,
    *,
    iteration: int,
    opts: DeviceOptions,
    last_checkpoint: Path | None,
) -> StepResult:
    """Train on ``batch`` (this rank's part of 0-based ``iteration``; None: nothing readable, a zero-weight
    step), ``bad`` its unreadable images. Every rank must call it for every iteration.

    Raises :class:`TrainingError` on a non-finite mean loss (naming the iteration, the losses and the
    batch's image ids over all ranks) before any weight changes, and
    :class:`~atssdet.distributed.DistributedError` when a collective fails.
    """
    images, targets, image_ids = _inputs(batch, opts.device)
    try:
        with opts.autocast():
            output = net(images)
        losses = atss_loss(output, targets, cfg)
        logged = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
        if batch is None:
            logged = torch.zeros_like(logged)
        stats = torch.cat([logged, torch.tensor([float(len(bad))], device=logged.device)])
        stats = distributed.all_reduce_sum(stats, what="all_reduce of the losses")
        # The step's one host read: mean losses (divided in float32, as logged before) and the bad count.
        *means, num_bad = torch.cat([stats[:-1] / distributed.get_world_size(), stats[-1:]]).tolist()
        mean = dict(zip(LOSS_KEYS, means, strict=True))
        if not all(math.isfinite(v) for v in means):
            raise _non_finite(mean, image_ids, iteration=iteration, last_checkpoint=last_checkpoint)
        total = losses["total_loss"] if batch is not None else losses["total_loss"] * 0.0
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(total).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    except (RuntimeError, dist.DistError) as exc:
        if isinstance(exc, TrainingError | distributed.DistributedError) or not distributed.is_distributed():
            raise
        raise distributed.collective_error(f"training step {iteration + 1}", exc) from exc
    return StepResult(losses=mean, num_bad=int(round(num_bad)))


def _non_finite(
    mean: dict[str, float], image_ids: list[int], *, iteration: int, last_checkpoint: Path | None
) -> TrainingError:
    ids = sorted(i for part in distributed.all_gather_object(image_ids) for i in part)
    values = ", ".join(f"{k}={v:.6g}" for k, v in mean.items())
    good = f"; the last good checkpoint {last_checkpoint} is untouched" if last_checkpoint else ""
    return TrainingError(
        f"non-finite loss at iteration {iteration + 1} ({values}) on the batch of image ids {ids}; stopping{good}"
    )

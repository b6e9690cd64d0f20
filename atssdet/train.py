"""Training: the MegEngine ATSS recipe, resumable, on one process or many (``torchrun``).

``result = train(cfg, train_ann=..., train_images=..., out_dir=...)`` runs SGD (momentum
``cfg.momentum``, weight decay ``cfg.weight_decay``) with ``lr = cfg.basic_lr * global batch``, a linear
warm-up over ``cfg.warm_iters`` iterations and a step decay ``x cfg.lr_decay_rate`` at the epochs
``cfg.lr_decay_stages`` (an epoch is ``cfg.nr_images_epoch`` images), exactly as MegEngine's
``tools/train.py``. Only parameters with ``requires_grad`` are optimised (``cfg.backbone_freeze_at``).

Checkpoints (``out_dir/iter_XXXXXXXX.pt`` every ``checkpoint_every`` iterations and at the end, plus
``out_dir/last.pt``, a hard link to the newest) are written to a temp file in the same folder, fsynced
and renamed, so a crash at any moment leaves every earlier checkpoint intact. Resuming restores the
model, optimizer, iteration (hence the learning rate and the data stream, via the sampler's
``start_batch``), GradScaler and RNG states: the resumed run computes the same losses as an
uninterrupted one. The final weights are also written as ``out_dir/model_final.safetensors`` (with the
config) for ``predict``/``eval --weights``.

Under ``torchrun`` the model is wrapped in DistributedDataParallel, every rank reads its own shard of
each epoch, the loss normalisers are averaged across ranks (:func:`atssdet.criterion.atss_loss`) and
only rank 0 writes files. Every collective has a timeout (``dist_timeout``), so a dead or stuck rank
ends the job with :class:`~atssdet.distributed.DistributedError` instead of a hang.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from atssdet import distributed
from atssdet.config import ATSSConfig
from atssdet.criterion import atss_loss
from atssdet.data.check import check_dataset
from atssdet.data.coco import COCODetection
from atssdet.data.loader import build_train_loader
from atssdet.data.transforms import TrainTransform
from atssdet.modeling.atss import ATSS, build_model

CHECKPOINT_FORMAT = "atssdet-train-checkpoint"
CHECKPOINT_VERSION = 1
LOG_NAME = "train_log.jsonl"
FINAL_WEIGHTS_NAME = "model_final.safetensors"
LOSS_NAMES = ("total_loss", "loss_cls", "loss_bbox", "loss_ctr")
_CKPT_RE = re.compile(r"^iter_(\d+)\.pt$")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, too many unreadable images); the message says why and where."""


@dataclass
class TrainResult:
    """What :func:`train` did (identical on every rank, except that files exist only once)."""

    start_iteration: int  # iterations already done when this call started (0, or the resumed checkpoint's)
    iteration: int  # iterations done at the end
    losses: list[dict[str, float]]  # one entry per iteration run by this call: iteration, losses, lr
    checkpoint: Path | None  # the last checkpoint written
    weights: Path | None  # final weights (.safetensors) when training reached its end
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"iteration", "stats"} per validation
    skipped_images: list[str] = field(default_factory=list)  # "file: reason" of unreadable images
    config: ATSSConfig | None = None


# --------------------------------------------------------------------------- schedule


def iters_per_epoch(cfg: ATSSConfig, global_batch: int) -> int:
    """MegEngine's ``tot_step = nr_images_epoch // global batch`` (at least 1)."""
    return max(1, cfg.nr_images_epoch // global_batch)


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


def total_iterations(cfg: ATSSConfig, global_batch: int) -> int:
    """``max_epoch`` epochs of ``nr_images_epoch`` images."""
    return cfg.max_epoch * iters_per_epoch(cfg, global_batch)


# --------------------------------------------------------------------------- weights


def _backbone_arrays(path: Path) -> dict[str, np.ndarray]:
    """ImageNet classification weights as ``{resnet key: array}``, ``fc.*`` and BN step counters dropped."""
    from atssdet.convert import CheckpointError, read_checkpoint_arrays

    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: unsupported backbone checkpoint type '.safetensors'; expected a torchvision .pth or a "
            "MegEngine classification .pkl"
        )
    arrays = read_checkpoint_arrays(path)[0]
    # torchvision's "module." prefix when saved from DataParallel
    arrays = {k.removeprefix("module."): v for k, v in arrays.items()}
    return {
        k: v for k, v in arrays.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def load_backbone_weights(model: ATSS, path: str | os.PathLike[str]) -> None:
    """Initialise ``model``'s ResNet from an ImageNet classification checkpoint (keys ``conv1``, ``bn1``, ``layerN``).

    Accepts torchvision ``.pth`` (read with ``weights_only=True``) and MegEngine classification ``.pkl``
    (restricted unpickler). The classifier ``fc.*`` is dropped; every other key must match the backbone
    (:class:`~atssdet.convert.CheckpointError` lists the mismatches otherwise).
    """
    from atssdet.convert import megengine_to_torch

    bottom_up = model.backbone.bottom_up
    state = megengine_to_torch(_backbone_arrays(Path(path)), bottom_up, source=str(path))
    bottom_up.load_state_dict(state, strict=True)


def _checkpoint_arrays(path: Path) -> dict[str, np.ndarray]:
    from atssdet.convert import read_checkpoint_arrays

    return read_checkpoint_arrays(path)[0]


def load_finetune_weights(model: ATSS, path: str | os.PathLike[str]) -> None:
    """Load a zoo-format detector checkpoint into ``model`` except its classifier ``head.cls_score``.

    ``model`` may predict another number of classes than the checkpoint: its freshly initialised
    ``cls_score`` (zero-mean weights, prior-probability bias) is kept, every other tensor comes from
    the checkpoint and must match in name and shape.
    """
    from atssdet.convert import megengine_to_torch

    arrays = {k: v for k, v in _checkpoint_arrays(Path(path)).items() if not k.startswith("head.cls_score.")}
    own = model.state_dict()
    for key in ("head.cls_score.weight", "head.cls_score.bias"):
        arrays[key] = own[key].detach().cpu().numpy()
    state = megengine_to_torch(arrays, model, source=str(path))
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- checkpoints


def _test_hook(name: str) -> tuple[int, float] | None:
    """Test-only fault injection: ``$ATSSDET_TEST_<NAME>`` = ``"A:B"`` (see tests/test_train_*.py)."""
    raw = os.environ.get(f"ATSSDET_TEST_{name}")
    if not raw:
        return None
    a, b = raw.split(":")
    return int(a), float(b)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint_atomic(state: dict[str, Any], path: Path) -> Path:
    """``torch.save`` to a temp file in ``path``'s folder, fsync, rename: ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        slow = _test_hook("SLOW_CHECKPOINT")  # iteration:seconds, to kill a process mid-write
        if slow is not None and slow[0] == state.get("iteration"):
            time.sleep(slow[1])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _link_last(path: Path, last: Path) -> None:
    """Point ``last`` at ``path`` atomically (hard link, or a copy where links are not supported)."""
    tmp = last.parent / f".{last.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, last)
    _fsync_dir(last.parent)


def checkpoint_path(out_dir: Path, iteration: int) -> Path:
    return out_dir / f"iter_{iteration:08d}.pt"


def _checkpoint_iteration(path: Path) -> int:
    match = _CKPT_RE.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """``iter_*.pt`` files in ``out_dir``, newest (highest iteration) first."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``); :class:`~atssdet.convert.CheckpointError` if unusable."""
    from atssdet.convert import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an atssdet training checkpoint (written by atssdet.train)")
    missing = [k for k in ("iteration", "model", "optimizer", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: training checkpoint lacks {', '.join(missing)}")
    return state


def find_resume_checkpoint(out_dir: str | os.PathLike[str]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``out_dir`` that loads cleanly, and why newer ones were passed over.

    ``iter_*.pt`` are tried newest first, then ``last.pt``. Returns ``(None, reasons)`` when none loads.
    """
    from atssdet.convert import CheckpointError

    reasons: list[str] = []
    last = Path(out_dir) / "last.pt"
    for path in [*list_checkpoints(out_dir), *([last] if last.is_file() else [])]:
        try:
            load_checkpoint(path)
        except CheckpointError as exc:
            reasons.append(str(exc))
            continue
        return path, reasons
    return None, reasons


def _rng_state() -> dict[str, Any]:
    # The legacy global generator: what third-party code (and user hooks) draw from.
    np_state: Any = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        # The current device's generator only: the job may resume on a machine with other GPUs.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state(state["cuda"][0])


# --------------------------------------------------------------------------- data


# --------------------------------------------------------------------------- logging


def _max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return float("nan")


class _JsonlLog:
    """Append-only JSONL log on rank 0 (one JSON object per line, flushed at once)."""

    def __init__(self, path: Path | None) -> None:
        self.file = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, sort_keys=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


# --------------------------------------------------------------------------- training


def _all_reduce_sum(values: Tensor) -> Tensor:
    if not distributed.is_distributed():
        return values
    try:
        dist.all_reduce(values)
    except (RuntimeError, dist.DistError) as exc:
        raise distributed._fail("all_reduce of the losses", exc) from exc
    return values


def build_optimizer(cfg: ATSSConfig, params: list[nn.Parameter], *, lr: float) -> torch.optim.Optimizer:
    """``cfg.optimizer``: SGD (momentum ``cfg.momentum``, the MegEngine recipe) or AdamW (the CPU demo preset,
    which trains from scratch in minutes); both with ``cfg.weight_decay`` on every parameter."""
    if cfg.optimizer == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected SGD or AdamW)")


def _config_diff(a: ATSSConfig, b: ATSSConfig) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"{k}: checkpoint {da[k]!r}, now {db[k]!r}" for k in da if k != "extra" and da[k] != db[k]]


def train(
    cfg: ATSSConfig,
    *,
    train_ann: str | os.PathLike[str],
    train_images: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    val_ann: str | os.PathLike[str] | None = None,
    val_images: str | os.PathLike[str] | None = None,
    batch_size: int = 2,
    max_iters: int | None = None,
    resume: str | os.PathLike[str] | None = None,
    amp: bool = False,
    device: str | torch.device | None = None,
    init_backbone: str | os.PathLike[str] | None = None,
    finetune: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 5000,
    keep_checkpoints: int | None = None,
    eval_every: int = 0,
    num_workers: int = 2,
    seed: int = 0,
    log_every: int | None = None,
    progress: bool = True,
    max_bad_images: int = 100,
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S,
    data_check: str = "full",
    allow_layout_change: bool = False,
) -> TrainResult:
    """Train an ATSS detector on a COCO-format split; see the module docstring for the recipe.

    Args:
        cfg: model and recipe. ``num_classes``/``class_names`` are taken from the training set.
        train_ann, train_images: COCO ``instances`` JSON and the folder its ``file_name`` is relative to.
        out_dir: checkpoints, ``train_log.jsonl``, validation results and the final weights go here.
        val_ann, val_images: optional validation split, evaluated (COCO mAP) every ``eval_every``
            iterations (0: only at the end) with :func:`atssdet.evaluate.evaluate`.
        batch_size: images per process; the global batch is ``batch_size * world_size`` and sets the lr.
        max_iters: stop after this many iterations (default: ``max_epoch`` epochs). The schedule
            (warm-up, decay epochs) does not change with it.
        resume: a checkpoint path, or ``"auto"``: the newest checkpoint in ``out_dir`` that loads
            (none: start from scratch). Continues exactly where that run stopped, which needs the
            checkpoint's processes x batch layout.
        allow_layout_change: resume a checkpoint written under another processes x batch layout
            (e.g. 8 GPUs -> 4): training continues at the same number of images seen (iteration
            ``saved_iteration * saved_global_batch // global_batch``) with the lr of the new global
            batch; the data order then differs from an uninterrupted run.
        amp: mixed precision (CUDA only): autocast float16 forward, float32 losses, GradScaler.
        device: default ``cuda`` if available (``cuda:LOCAL_RANK`` under torchrun), else ``cpu``.
        init_backbone: ImageNet ResNet weights (torchvision ``.pth`` or MegEngine ``.pkl``).
        finetune: a detector checkpoint (zoo ``.pkl``, ``.safetensors``, ``.pt``) to start from; its
            classifier is replaced when the class count differs (always re-initialised).
        checkpoint_every: write ``iter_XXXXXXXX.pt`` (and ``last.pt``) every this many iterations.
        keep_checkpoints: keep only the newest this many ``iter_*.pt`` files (None: keep all).
        num_workers: DataLoader worker processes per rank.
        seed: model initialisation and the data order/augmentation stream.
        log_every: JSONL record every this many iterations (default ``cfg.log_interval``).
        max_bad_images: stop with :class:`TrainingError` once more unreadable images were skipped.
        dist_timeout: seconds before a collective that waits for a dead/stuck rank fails.
        data_check: ``"full"`` (default): :func:`atssdet.data.check.check_dataset` on the training
            split, decoding every image, before anything else; ``"quick"``: the annotation file and
            that the image files exist; ``"off"``. Fatal problems stop training with the report.

    Raises:
        TrainingError: non-finite loss (message names iteration and image ids; earlier checkpoints are
            untouched) or too many unreadable images.
        DistributedError: another rank died or hung.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if init_backbone is not None and finetune is not None:
        raise ValueError("give either init_backbone or finetune, not both")
    info = distributed.init_distributed(device=device, timeout=dist_timeout)
    dev = distributed.resolve_device(device)
    if amp and dev.type != "cuda":
        raise ValueError(f"--amp needs a CUDA device (got {dev}); mixed precision on CPU is not supported")
    world, rank, main = info.world_size, info.rank, info.is_main
    if cfg.backbone_norm == "SyncBN" and world > 1 and dev.type != "cuda":
        raise ValueError(
            "backbone_norm=SyncBN needs CUDA devices under DDP (torch's SyncBatchNorm has no CPU kernel); "
            "use BN, GN or FrozenBN on CPU"
        )
    global_batch = batch_size * world
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # temp files of a run killed mid-write
            stale.unlink(missing_ok=True)

    if data_check not in ("full", "quick", "off"):
        raise ValueError(f"data_check must be 'full', 'quick' or 'off', got {data_check!r}")
    if data_check != "off":
        # The same checks as `atssdet data check`, once (rank 0), shared so every rank stops alike.
        report = None
        if main:
            report = check_dataset(
                train_ann, train_images, read_images=data_check == "full", progress=progress
            )
            if report.ok and report.warnings:
                print(
                    f"atssdet train: data check: {len(report.warnings)} kind(s) of warning in {train_ann}; "
                    "`python -m atssdet data check` lists them",
                    file=sys.stderr,
                )
        report = distributed.broadcast_object(report)
        assert report is not None
        report.raise_if_fatal()

    dataset = COCODetection(
        train_ann,
        train_images,
        remove_images_without_annotations=True,
        transform=TrainTransform(short_sizes=cfg.train_image_short_size, max_size=cfg.train_image_max_size),
    )
    if len(dataset) < world:
        raise ValueError(f"{train_ann}: {len(dataset)} annotated image(s), fewer than the {world} ranks")
    if (cfg.num_classes, cfg.class_names) != (dataset.num_classes, dataset.class_names):
        cfg = dataclasses.replace(cfg, num_classes=dataset.num_classes, class_names=dataset.class_names)

    # --- resume: rank 0 picks the file, everyone loads it
    ckpt: dict[str, Any] | None = None
    resume_path: Path | None = None
    relayout_from: tuple[int, int] | None = None  # (world, batch) of the checkpoint, if it differs
    relayout_start = 0  # with relayout_from: the iteration of this layout at the same images seen
    if resume is not None:
        if str(resume) == "auto":
            found: tuple[Path | None, list[str]] = (None, [])
            if main:
                found = find_resume_checkpoint(out)
            found = distributed.broadcast_object(found)
            resume_path, reasons = found
            if main:
                for reason in reasons:
                    print(f"atssdet train: skipping unusable checkpoint: {reason}", file=sys.stderr)
                if resume_path is None:
                    print(f"atssdet train: --resume auto: no checkpoint in {out}; starting from scratch")
        else:
            resume_path = Path(resume)
        if resume_path is not None:
            ckpt = load_checkpoint(resume_path)
            saved_cfg = ATSSConfig.from_json(ckpt["config"])
            diff = _config_diff(saved_cfg, cfg)
            if diff:
                raise ValueError(
                    f"{resume_path}: was trained with another config; differences:\n  " + "\n  ".join(diff)
                )
            saved_layout = (int(ckpt.get("world_size", 0)), int(ckpt.get("batch_size", 0)))
            if saved_layout != (world, batch_size):
                if not allow_layout_change or min(saved_layout) < 1:
                    raise ValueError(
                        f"{resume_path}: was trained with {saved_layout[0]} process(es) x batch "
                        f"{saved_layout[1]}; resume with the same layout (now {world} x {batch_size}) to "
                        "continue the same data stream, or allow the change (--allow-layout-change) to "
                        "continue at the same number of images seen with another data order"
                    )
                relayout_from = saved_layout
                # Iteration numbers of two layouts must not mix in one folder: --resume auto and
                # keep_checkpoints order checkpoints by iteration number.
                # Same number of images seen, so the epoch-based schedule (decay stages) lines up.
                relayout_start = int(ckpt["iteration"]) * saved_layout[0] * saved_layout[1] // global_batch
                later: list[str] = []
                if main:
                    later = [
                        p.name for p in list_checkpoints(out) if _checkpoint_iteration(p) > relayout_start
                    ]
                later = distributed.broadcast_object(later)
                if later:
                    raise ValueError(
                        f"{out}: holds checkpoints past iteration {relayout_start} (where the run continues "
                        f"as {world} x {batch_size}): {', '.join(sorted(later)[:3])}"
                        f"{' ...' if len(later) > 3 else ''}; two layouts' iteration numbers would mix. "
                        f"Continue in a new folder: --resume {resume_path} --allow-layout-change --out NEW_DIR"
                    )
            seed = int(ckpt.get("seed", seed))

    # --- model
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    model = build_model(cfg)
    if ckpt is None:
        if init_backbone is not None:
            load_backbone_weights(model, init_backbone)
        if finetune is not None:
            load_finetune_weights(model, finetune)
    else:
        model.load_state_dict(ckpt["model"], strict=True)
    model.to(dev)
    if cfg.backbone_norm == "SyncBN" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, lr=learning_rate(cfg, 0, global_batch=global_batch))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start_iter = 0
    skipped: list[str] = []  # this rank's unreadable images
    bad_total = 0  # unreadable images over all ranks
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_iter = int(ckpt["iteration"])
        skipped = list(ckpt.get("skipped_images", []))
        bad_total = int(ckpt.get("bad_images_total", 0))
        rng_states = ckpt.get("rng") or []
        if relayout_from is not None:
            start_iter = relayout_start
            rank_seed = (seed * 1_000_003 + start_iter) * 4096 + rank
            torch.manual_seed(rank_seed)
            random.seed(rank_seed)
            np.random.seed(rank_seed % 2**32)  # noqa: NPY002
            if main:
                print(
                    f"atssdet train: {resume_path} was trained as {relayout_from[0]} x {relayout_from[1]} "
                    f"(iteration {int(ckpt['iteration'])}, "
                    f"{int(ckpt['iteration']) * relayout_from[0] * relayout_from[1]} images); continuing as {world} x "
                    f"{batch_size} at iteration {start_iter}. The learning rate follows the new global "
                    f"batch {global_batch}; the data order differs from an uninterrupted run.",
                    file=sys.stderr,
                )
        elif len(rng_states) == world:
            _set_rng_state(rng_states[rank])
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    model.train()

    end_iter = max_iters if max_iters is not None else total_iterations(cfg, global_batch)
    log_every = log_every or cfg.log_interval
    loader = build_train_loader(
        dataset,
        batch_size=batch_size,
        seed=seed,
        num_workers=num_workers,
        rank=rank,
        world_size=world,
        start_batch=start_iter,
        pin_memory=dev.type == "cuda",
        skip_unreadable=True,
    )

    log = _JsonlLog(out / LOG_NAME if main else None)
    result = TrainResult(
        start_iteration=start_iter, iteration=start_iter, losses=[], checkpoint=resume_path, weights=None,
        skipped_images=skipped, config=cfg,
    )  # fmt: skip
    if main:
        log.write(
            {
                "event": "start",
                "iteration": start_iter,
                "max_iters": end_iter,
                "world_size": world,
                "batch_size": batch_size,
                "global_batch": global_batch,
                "device": str(dev),
                "amp": amp,
                "resumed_from": str(resume_path) if resume_path else None,
                "resumed_layout": (
                    None
                    if relayout_from is None or ckpt is None
                    else {
                        "world_size": relayout_from[0],
                        "batch_size": relayout_from[1],
                        "iteration": int(ckpt["iteration"]),
                    }
                ),
                "num_images": len(dataset),
                "config": json.loads(cfg.to_json()),
            }
        )
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=end_iter, initial=start_iter, desc="train", unit="it", dynamic_ncols=True)

    def say(msg: str) -> None:
        if not main:
            return
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    def save(iteration: int) -> Path:
        rng_all = distributed.all_gather_object(_rng_state())
        path = checkpoint_path(out, iteration)
        if main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {
                    "iteration": iteration,
                    "global_batch": global_batch,
                    "lr": learning_rate(cfg, iteration, global_batch=global_batch),
                },
                "scaler": scaler.state_dict() if amp else None,
                "rng": rng_all,
                "config": cfg.to_json(),
                "world_size": world,
                "batch_size": batch_size,
                "seed": seed,
                "skipped_images": list(skipped),
                "bad_images_total": bad_total,
            }
            save_checkpoint_atomic(state, path)
            _link_last(path, out / "last.pt")
            if keep_checkpoints is not None:
                for old in list_checkpoints(out)[max(1, keep_checkpoints) :]:
                    old.unlink(missing_ok=True)
            log.write({"event": "checkpoint", "iteration": iteration, "path": str(path)})
        distributed.barrier()
        result.checkpoint = path
        return path

    def validate(iteration: int) -> None:
        from atssdet.evaluate import evaluate

        assert val_ann is not None and val_images is not None
        report = evaluate(
            net,
            val_ann,
            val_images,
            batch_size=batch_size,
            device=dev,
            out=out / "eval" / f"iter_{iteration:08d}.results.json",
            num_workers=num_workers,
            progress=False,
        )
        result.evals.append({"iteration": iteration, "stats": report.stats})
        log.write(
            {"event": "eval", "iteration": iteration, **{f"bbox/{k}": v for k, v in report.stats.items()}}
        )
        say(f"iter {iteration}: val AP {report.stats['AP']:.4f} AP50 {report.stats['AP50']:.4f}")
        model.train()

    stall = _test_hook("STALL_RANK")  # rank:iteration -> this rank stops responding (timeout tests)
    kill = _test_hook("KILL_RANK")  # rank:iteration -> this rank SIGKILLs itself

    data_iter = iter(loader)
    empty_image = torch.zeros((1, 3, 32, 32), device=dev)
    t_last = time.perf_counter()
    step_times: collections.deque[float] = collections.deque(maxlen=20)  # for the ETA
    try:
        for iteration in range(start_iter, end_iter):
            if stall is not None and stall[0] == rank and iteration == int(stall[1]):
                time.sleep(3600)
            if kill is not None and kill[0] == rank and iteration == int(kill[1]):
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.perf_counter()
            batch, bad = next(data_iter)
            data_time = time.perf_counter() - t0
            for reason in bad:  # every rank reports its own
                print(f"atssdet train: warning: skipping unreadable image: {reason}", file=sys.stderr)
            lr = learning_rate(cfg, iteration, global_batch=global_batch)
            for group in optimizer.param_groups:
                group["lr"] = lr

            if batch is not None:
                batch = batch.to(dev, non_blocking=True)
                images = batch.images
                targets = [{"boxes": t.boxes, "labels": t.labels} for t in batch.targets]
                image_ids = batch.image_ids
            else:  # every image of this rank's batch was unreadable: a zero-weight step keeps DDP in step
                images = empty_image
                targets = [
                    {
                        "boxes": torch.zeros((0, 4), device=dev),
                        "labels": torch.zeros(0, dtype=torch.long, device=dev),
                    }
                ]
                image_ids = []
            try:
                with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
                    output = net(images)
                losses = atss_loss(output, targets, cfg)
                total = losses["total_loss"] if batch is not None else losses["total_loss"] * 0.0
                logged = torch.stack([losses[k].detach().float() for k in LOSS_NAMES])
                if batch is None:
                    logged = torch.zeros_like(logged)
                stats = torch.cat([logged, torch.tensor([float(len(bad))], device=logged.device)])
                stats = _all_reduce_sum(stats)
                mean_losses = (stats[: len(LOSS_NAMES)] / world).tolist()
                num_bad = int(round(float(stats[-1])))
                if not all(math.isfinite(v) for v in mean_losses):
                    ids = sorted(i for part in distributed.all_gather_object(image_ids) for i in part)
                    values = ", ".join(f"{k}={v:.6g}" for k, v in zip(LOSS_NAMES, mean_losses, strict=True))
                    good = (
                        f"; the last good checkpoint {result.checkpoint} is untouched"
                        if result.checkpoint
                        else ""
                    )
                    raise TrainingError(
                        f"non-finite loss at iteration {iteration + 1} ({values}) on the batch of image ids "
                        f"{ids}; stopping{good}"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
            except (RuntimeError, dist.DistError) as exc:
                if (
                    isinstance(exc, TrainingError | distributed.DistributedError)
                    or not distributed.is_distributed()
                ):
                    raise
                raise distributed._fail(f"training step {iteration + 1}", exc) from exc

            skipped.extend(bad)
            bad_total += num_bad
            done = iteration + 1
            now = time.perf_counter()
            iter_time = now - t_last
            t_last = now
            step_times.append(iter_time)
            eta = sum(step_times) / len(step_times) * (end_iter - done)
            record = {"iteration": done, **dict(zip(LOSS_NAMES, mean_losses, strict=True)), "lr": lr}
            result.losses.append(record)
            result.iteration = done
            if bar is not None:
                bar.set_postfix(loss=f"{mean_losses[0]:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            if main and (done % log_every == 0 or done == end_iter or done == start_iter + 1):
                log.write(
                    {
                        **record,
                        "time": round(iter_time, 4),
                        "data_time": round(data_time, 4),
                        "eta": _format_eta(eta),
                        "eta_s": round(eta, 1),
                        "max_mem_mb": round(_max_memory_mb(dev), 1),
                        "skipped_images": bad_total,
                    }
                )
                if bar is None:
                    say(
                        f"iter {done}/{end_iter} loss {mean_losses[0]:.4f} (cls {mean_losses[1]:.4f} bbox "
                        f"{mean_losses[2]:.4f} ctr {mean_losses[3]:.4f}) lr {lr:.3g} {iter_time:.3f}s/it "
                        f"data {data_time:.3f}s eta {_format_eta(eta)}"
                    )
            if bad_total > max_bad_images:
                raise TrainingError(
                    f"{bad_total} unreadable training images skipped, more than the limit of {max_bad_images} "
                    f"(at iteration {done}; see the warnings above); fix the dataset or raise --max-bad-images"
                )
            if done % checkpoint_every == 0 or done == end_iter:
                save(done)
            if (
                val_ann is not None
                and val_images is not None
                and ((eval_every and done % eval_every == 0) or done == end_iter)
            ):
                validate(done)
    finally:
        if bar is not None:
            bar.close()
        log.close()

    if result.iteration == end_iter:
        result.weights = out / FINAL_WEIGHTS_NAME
        if main:
            from atssdet.convert import save_safetensors

            save_safetensors(model.state_dict(), result.weights, cfg=cfg)
            say(f"wrote {result.weights}")
    distributed.barrier()
    return result

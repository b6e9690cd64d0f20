"""Training checkpoints: what one holds, how it is written and found again, and what a resume checks.

``out_dir/iter_XXXXXXXX.pt`` (a ``torch.save`` dict, see :meth:`Checkpointer.state`) plus
``out_dir/last.pt``, a hard link to the newest. Every file goes through :mod:`atssdet.fileio` (temp
file, fsync, rename, folder fsync), so a crash at any moment leaves every earlier checkpoint intact;
a killed run's temp files are removed when the next run starts (:func:`prepare_out_dir`: atssdet's
own temp names only). Which run a folder and its checkpoints belong to is
:mod:`atssdet.training.ownership`'s (``state["run_id"]``).

A resume restores the model, optimizer, iteration (hence the learning rate and the data stream),
GradScaler and every rank's RNG states, so the resumed run computes the losses of an uninterrupted
one. It refuses a checkpoint trained with another model, data pipeline or recipe
(:func:`atssdet.config.training_differences`) or, unless allowed, another processes x batch layout.
"""

from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from atssdet import distributed
from atssdet.config import ATSSConfig, training_differences
from atssdet.convert import CheckpointError, save_safetensors
from atssdet.errors import torch_load_problem
from atssdet.fileio import atomic_link, atomic_path, temp_target
from atssdet.training.schedule import learning_rate

if TYPE_CHECKING:
    from atssdet.training.ownership import RunFolder

CHECKPOINT_FORMAT = "atssdet-train-checkpoint"
CHECKPOINT_VERSION = 1
LAST_NAME = "last.pt"
FINAL_WEIGHTS_NAME = "model_final.safetensors"
_CKPT_RE = re.compile(r"^iter_(\d+)\.pt$")


def checkpoint_path(out_dir: str | os.PathLike[str], iteration: int) -> Path:
    """``out_dir/iter_XXXXXXXX.pt`` (8 digits: names sort by iteration)."""
    return Path(out_dir) / f"iter_{iteration:08d}.pt"


def checkpoint_iteration(path: Path) -> int:
    """The iteration in an ``iter_XXXXXXXX.pt`` name; -1 for any other name."""
    match = _CKPT_RE.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """``iter_*.pt`` files in ``out_dir``, newest (highest iteration) first."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = [(checkpoint_iteration(p), p) for p in folder.iterdir() if _CKPT_RE.match(p.name)]
    return [p for _, p in sorted(found, reverse=True)]


def prepare_out_dir(out_dir: Path, *, also: tuple[str, ...] = ()) -> None:
    """Create ``out_dir`` and remove the temp files of a run killed mid-write: only the temp names
    :mod:`atssdet.fileio` gives the files training writes (and ``also``), never the user's ``.*.tmp``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = {LAST_NAME, FINAL_WEIGHTS_NAME, *also}
    for stale in out_dir.iterdir():
        name = temp_target(stale)
        if name is not None and stale.name.endswith(".tmp") and (name in ours or _CKPT_RE.match(name)):
            stale.unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """``torch.save`` to a temp file in ``path``'s folder, fsync, rename: ``path`` is never half-written."""
    with atomic_path(path, sync_dir=True) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``); :class:`~atssdet.convert.CheckpointError` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {torch_load_problem(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an atssdet training checkpoint (written by atssdet.training)")
    missing = [k for k in ("iteration", "model", "optimizer", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: training checkpoint lacks {', '.join(missing)}")
    return state


def find_resume_checkpoint(
    out_dir: str | os.PathLike[str], *, run: RunFolder | None = None
) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``out_dir`` that loads cleanly, and why newer ones were passed over.

    ``iter_*.pt`` are tried newest first, then ``last.pt``; with ``run`` only that run's checkpoints
    (where the folder records them). Returns ``(None, reasons)`` when none loads.
    """
    reasons: list[str] = []
    last = Path(out_dir) / LAST_NAME
    own = run.own_checkpoints() if run is not None else None
    for path in own if own is not None else [*list_checkpoints(out_dir), *([last] if last.is_file() else [])]:
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            reasons.append(str(exc))
            continue
        if run is not None and (foreign := run.not_ours(path, state)):
            reasons.append(foreign)
            continue
        return path, reasons
    return None, reasons


# --------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and NumPy's legacy global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
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


# --------------------------------------------------------------------------- writing


@dataclass
class TrainingState:
    """What a checkpoint holds besides config, layout and RNG: the mutable state of a run."""

    model: nn.Module  # the bare model (not the DDP wrapper): checkpoint keys are the model's
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    skipped_images: list[str] = field(default_factory=list)  # this rank's "file: reason" of unreadable images
    bad_images_total: int = 0  # unreadable images skipped over all ranks


class Checkpointer:
    """Writes the checkpoints of one run: rank 0 writes, every rank joins the RNG gather and the barrier."""

    def __init__(
        self, out_dir: Path, cfg: ATSSConfig, *, batch_size: int, seed: int, keep: int | None,
        run: RunFolder | None = None,
    ) -> None:  # fmt: skip
        self.out_dir, self.cfg, self.batch_size, self.seed, self.keep = out_dir, cfg, batch_size, seed, keep
        self.world_size = distributed.get_world_size()
        self.run = run  # the folder's owner: run id, and which checkpoints pruning may delete

    def state(self, iteration: int, run: TrainingState, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint dict; ``rng`` holds every rank's :func:`rng_state`, in rank order."""
        global_batch = self.world_size * self.batch_size
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": {
                "iteration": iteration,
                "global_batch": global_batch,
                "lr": learning_rate(self.cfg, iteration, global_batch=global_batch),
            },
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "rng": rng,
            "config": self.cfg.to_json(),
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "skipped_images": list(run.skipped_images),
            "bad_images_total": run.bad_images_total,
            "run_id": self.run.run_id if self.run is not None else None,
        }

    def save(self, iteration: int, run: TrainingState) -> Path:
        """Write ``iter_XXXXXXXX.pt``, point ``last.pt`` at it and keep only the newest ``keep``;
        returns its path (on every rank)."""
        rng = distributed.all_gather_object(rng_state())
        path = checkpoint_path(self.out_dir, iteration)
        if distributed.is_main_process():
            if self.run is not None:
                self.run.add_checkpoint(path)
            save_checkpoint(self.state(iteration, run, rng), path)
            atomic_link(path, self.out_dir / LAST_NAME, sync_dir=True)
            if self.keep is not None and self.run is not None:
                self.run.prune(self.keep, newest=path)  # only this run's checkpoints, never the newest
            elif self.keep is not None:
                for old in list_checkpoints(self.out_dir)[max(1, self.keep) :]:
                    old.unlink(missing_ok=True)
        distributed.barrier()
        return path


def save_final_weights(model: nn.Module, path: Path, cfg: ATSSConfig) -> Path:
    """The trained weights as ``.safetensors`` with ``cfg`` in its metadata (for ``predict``/``eval --weights``)."""
    return save_safetensors(model.state_dict(), path, cfg=cfg)


# --------------------------------------------------------------------------- resuming


@dataclass(frozen=True)
class Resume:
    """A checkpoint this run continues from, checked against the run's config and layout."""

    path: Path
    state: dict[str, Any]  # as :func:`load_checkpoint` returns it
    start_iteration: (
        int  # where this run continues: the saved iteration, or its equivalent after a layout change
    )
    saved_layout: tuple[int, int]  # (world_size, batch_size) the checkpoint was written with
    layout_changed: bool

    @property
    def saved_iteration(self) -> int:
        return int(self.state["iteration"])

    @property
    def seed(self) -> int | None:
        return int(self.state["seed"]) if "seed" in self.state else None


def open_resume(
    resume: str | os.PathLike[str],
    out_dir: Path,
    cfg: ATSSConfig,
    *,
    batch_size: int,
    allow_layout_change: bool,
    run: RunFolder | None = None,
) -> Resume | None:
    """Load and check the checkpoint ``resume`` names (a path, or ``"auto"``: the newest usable one in
    ``out_dir``, of the folder's ``run`` if given; None when there is none). Raises ValueError when
    it would not continue this run."""
    path = Path(resume) if str(resume) != "auto" else _find_auto(out_dir, run)
    if path is None:
        return None
    state = load_checkpoint(path)
    diff = training_differences(ATSSConfig.from_json(state["config"]), cfg)
    if diff:
        raise ValueError(f"{path}: was trained with another config; differences:\n  " + "\n  ".join(diff))
    world = distributed.get_world_size()
    saved = (int(state.get("world_size", 0)), int(state.get("batch_size", 0)))
    if saved == (world, batch_size):
        return Resume(path, state, int(state["iteration"]), saved, layout_changed=False)
    if not allow_layout_change or min(saved) < 1:
        raise ValueError(
            f"{path}: was trained with {saved[0]} process(es) x batch {saved[1]}; resume with the same "
            f"layout (now {world} x {batch_size}) to continue the same data stream, or allow the change "
            "(--allow-layout-change) to continue at the same number of images seen with another data order"
        )
    # Same number of images seen, so the epoch-based schedule (decay stages) lines up.
    start = int(state["iteration"]) * saved[0] * saved[1] // (world * batch_size)
    _refuse_later_checkpoints(out_dir, start, path, layout=(world, batch_size))
    if distributed.is_main_process():
        print(
            f"atssdet train: {path} was trained as {saved[0]} x {saved[1]} (iteration {state['iteration']}, "
            f"{int(state['iteration']) * saved[0] * saved[1]} images); continuing as {world} x {batch_size} at "
            f"iteration {start}. The learning rate follows the new global batch {world * batch_size}; the "
            "data order differs from an uninterrupted run.",
            file=sys.stderr,
        )
    return Resume(path, state, start, saved, layout_changed=True)


def _find_auto(out_dir: Path, run: RunFolder | None = None) -> Path | None:
    """``--resume auto``: rank 0 picks the newest usable checkpoint (saying what it passed over)."""
    found: tuple[Path | None, list[str]] = (None, [])
    if distributed.is_main_process():
        found = find_resume_checkpoint(out_dir, run=run)
        for reason in found[1]:
            print(f"atssdet train: skipping unusable checkpoint: {reason}", file=sys.stderr)
        if found[0] is None:
            print(f"atssdet train: --resume auto: no checkpoint in {out_dir}; starting from scratch")
    return distributed.broadcast_object(found)[0]


def _refuse_later_checkpoints(out_dir: Path, start: int, path: Path, *, layout: tuple[int, int]) -> None:
    """Iteration numbers of two layouts must not mix in one folder: ``--resume auto`` and
    ``keep_checkpoints`` order checkpoints by iteration number."""
    later: list[str] = []
    if distributed.is_main_process():
        later = [p.name for p in list_checkpoints(out_dir) if checkpoint_iteration(p) > start]
    later = distributed.broadcast_object(later)
    if later:
        raise ValueError(
            f"{out_dir}: holds checkpoints past iteration {start} (where the run continues as {layout[0]} x "
            f"{layout[1]}): {', '.join(sorted(later)[:3])}{' ...' if len(later) > 3 else ''}; two layouts' "
            f"iteration numbers would mix. Continue in a new folder: --resume {path} --allow-layout-change "
            "--out NEW_DIR"
        )


def restore(resume: Resume, run: TrainingState, *, seed: int) -> None:
    """Optimizer, GradScaler, bad-image counts and this rank's RNG state from ``resume`` (the model's
    weights are loaded before it moves to its device).

    After a layout change the saved RNG states belong to other ranks: each rank is re-seeded from
    ``seed``, the start iteration and its rank instead.
    """
    state = resume.state
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.skipped_images[:] = list(state.get("skipped_images", []))
    run.bad_images_total = int(state.get("bad_images_total", 0))
    rank, world = distributed.get_rank(), distributed.get_world_size()
    rng_states = state.get("rng") or []
    if resume.layout_changed:
        seed_everything((seed * 1_000_003 + resume.start_iteration) * 4096 + rank)
    elif len(rng_states) == world:
        set_rng_state(rng_states[rank])

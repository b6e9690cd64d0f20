"""The demo's training step: checkpoints as it trains, continues an interrupted run, history from the log.

:func:`train_demo` trains into ``runs/demo/train`` with a checkpoint every :func:`checkpoint_every`
iterations. A re-run whose newest checkpoint there has the same config and demo plan continues it
(``resume="auto"``; the resumed run computes the uninterrupted run's losses, so it ends with the
same model and metrics); a demo run of another config is replaced by a new run; files of any other
run are left alone unless ``overwrite``. The history (losses per iteration, validations) is read
back from ``train_log.jsonl`` (:func:`history_from_log`), so it covers the killed process's part too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atssdet.config import ATSSConfig
from atssdet.criterion import LOSS_KEYS

if TYPE_CHECKING:
    from atssdet.data.synth import SynthDataset
    from atssdet.demo import DemoPlan

MAX_CHECKPOINT_EVERY = 100  # iterations a killed demo loses at most (about 2 min of the full demo on CPU)


def checkpoint_every(plan: DemoPlan) -> int:
    """Training checkpoints every this many iterations: at each validation, at most :data:`MAX_CHECKPOINT_EVERY`."""
    return max(1, min(plan.eval_every, MAX_CHECKPOINT_EVERY))


def same_demo(saved: ATSSConfig, cfg: ATSSConfig) -> bool:
    """Same config and the same demo plan (``extra`` is not part of config equality)."""
    return saved == cfg and saved.extra.get("demo") == cfg.extra.get("demo")


def train_demo(
    cfg: ATSSConfig,
    plan: DemoPlan,
    dataset: SynthDataset,
    train_dir: Path,
    dev: torch.device,
    *,
    name: str,
    num_workers: int,
    progress: bool,
    say: Callable[[str], None],
    retrain: bool,
    overwrite: bool,
) -> tuple[dict[str, Any], float, Path]:
    """Train the demo model ``name`` into ``train_dir``, continuing the run there when it has the
    same config and plan (unless ``retrain``). Returns the history of the whole run (read back from
    its log, so a continued run has every iteration), this process's seconds and the final weights."""
    from atssdet.training import train
    from atssdet.training.log import LOG_NAME
    from atssdet.training.schedule import total_iterations

    iters = total_iterations(cfg, plan.batch_size)
    resume, replace = _resume_mode(train_dir, cfg, retrain=retrain, overwrite=overwrite)
    what = (
        f"continuing the interrupted training of {name} in {train_dir}"
        if resume
        else f"training {name} from scratch"
    )
    say(
        f"{what}: {iters} iterations of {plan.batch_size} images on {dev} ({torch.get_num_threads()} thread(s))"
    )
    t0 = time.perf_counter()
    result = train(
        cfg,
        train_ann=dataset.train_ann,
        train_images=dataset.train_images,
        out_dir=train_dir,
        val_ann=dataset.val_ann,
        val_images=dataset.val_images,
        batch_size=plan.batch_size,
        max_iters=iters,
        device=dev,
        resume=resume,
        overwrite=replace,
        checkpoint_every=checkpoint_every(plan),
        keep_checkpoints=1,
        eval_every=plan.eval_every,
        num_workers=num_workers,
        seed=plan.seed,
        log_every=1,  # the history is read back from the log: every iteration, also of a killed run
        progress=progress,
        data_check="quick",  # the generator just wrote (or verified) every file; no need to decode all
    )
    seconds = time.perf_counter() - t0
    if result.weights is None or not result.weights.is_file():
        raise RuntimeError(f"training stopped before its end (iteration {result.iteration} of {iters})")
    say(f"trained in {seconds / 60:.1f} min")
    history = history_from_log(train_dir / LOG_NAME)
    # The earlier process's share: its step times up to where this run continued.
    earlier = sum(
        t
        for i, t in zip(history["iteration"], history["step_seconds"], strict=True)
        if i <= result.start_iteration
    )
    history.update(
        {"train_seconds": seconds + earlier, "device": str(dev),
         "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None}
    )  # fmt: skip
    return history, seconds, result.weights


def _resume_mode(
    train_dir: Path, cfg: ATSSConfig, *, retrain: bool, overwrite: bool
) -> tuple[str | None, bool]:
    """``(resume, overwrite)`` for :func:`atssdet.training.train`: continue the run in ``train_dir``
    when its newest checkpoint has ``cfg`` and the plan; else a new run, over an older demo run's
    files (another config, or ``retrain``) but over anything else only with ``overwrite``."""
    from atssdet.training.checkpoint import find_resume_checkpoint, load_checkpoint

    found, _ = find_resume_checkpoint(train_dir)
    if found is None:
        return None, overwrite
    saved = ATSSConfig.from_json(load_checkpoint(found)["config"])
    if not retrain and same_demo(saved, cfg):
        return "auto", False
    return None, overwrite or "demo" in saved.extra


def history_from_log(log: Path) -> dict[str, Any]:
    """Losses per iteration, lr, step seconds and validations of the run that ``train_log.jsonl``
    ``log`` ends with (written with ``log_every=1``). A start record at iteration ``s`` (a resume)
    drops what a killed process had logged past ``s``; at 0 (a new run) everything before it."""
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, float]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a killed process may be cut
            continue
        iteration = int(record.get("iteration", 0))
        if record.get("event") == "start":
            steps = {i: r for i, r in steps.items() if i <= iteration}
            evals = {i: e for i, e in evals.items() if i <= iteration}
        elif record.get("event") == "eval":
            evals[iteration] = {k[len("bbox/") :]: v for k, v in record.items() if k.startswith("bbox/")}
        elif "total_loss" in record:
            steps[iteration] = record
    order = sorted(steps)
    history: dict[str, Any] = {
        "iteration": order,
        "lr": [steps[i]["lr"] for i in order],
        "step_seconds": [steps[i].get("time", 0.0) for i in order],
        "evals": [{"iteration": i, "stats": evals[i]} for i in sorted(evals)],
    }
    for key in LOSS_KEYS:
        history[key] = [steps[i][key] for i in order]
    return history

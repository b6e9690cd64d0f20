"""The offline demo: synthetic shapes -> train a CPU-sized ATSS from scratch -> COCO mAP -> drawn detections.

``run_demo(out_dir)`` (``python -m atssdet demo``) needs no network and no pretrained weights:

1. generates the synthetic shapes dataset (:mod:`atssdet.data.synth`) under ``out_dir/data``, or
   reuses it when it is already there with the same parameters;
2. trains the ``atss_demo_cpu`` preset (:data:`atssdet.config.DEMO_PRESETS`) with
   :func:`atssdet.training.train` (progress bar with ETA, validation mAP along the way), unless
   ``out_dir/model.safetensors`` already holds a model trained with the same config and plan;
3. evaluates COCO mAP on the val split (:func:`atssdet.evaluation.evaluate`);
4. detects objects on held-out val images and draws them;
5. plots training loss and val mAP over the iterations.

Everything lands in ``out_dir`` (see :class:`DemoResult`); ``model.safetensors`` carries its config,
so ``python -m atssdet predict --weights out_dir/model.safetensors IMAGE`` works on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atssdet.config import DEMO_PRESETS, ATSSConfig, with_overrides
from atssdet.criterion import LOSS_KEYS
from atssdet.data.image_io import read_image
from atssdet.data.synth import SynthDataset, generate_synthetic_dataset
from atssdet.demo_plots import draw_enlarged, make_grid, plot_history, write_image
from atssdet.fileio import atomic_copy, atomic_write_json

DEMO_MODEL = "atss_demo_cpu"
CHECKPOINT_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.json"
PLOT_NAME = "training.png"
PREDICTIONS_DIR = "predictions"
GRID_NAME = "detections.png"
DRAW_SCORE_THRESHOLD = 0.35  # drawn pictures only
DRAW_NMS = 0.5  # drawn pictures only: class-agnostic


@dataclass(frozen=True)
class DemoPlan:
    """Dataset and run sizes of a demo; the learning-rate schedule itself is in the config.

    ``schedule`` overrides config fields (e.g. ``nr_images_epoch``, ``max_epoch``, ``warm_iters``):
    training runs ``max_epoch`` epochs of ``nr_images_epoch // batch_size`` iterations.
    """

    num_train: int
    num_val: int
    image_size: tuple[int, int]  # (min, max) side of the generated images
    seed: int
    batch_size: int
    eval_every: int  # validation every this many iterations (and at the end)
    num_predict: int  # held-out images drawn
    schedule: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        # JSON round trip: tuples become lists, as in the checkpoint metadata.
        return dict(json.loads(json.dumps(dataclasses.asdict(self))))


# The full demo; see docs/demo.md for the measurements behind these sizes.
FULL_PLAN = DemoPlan(
    num_train=2000, num_val=300, image_size=(128, 192), seed=0, batch_size=8, eval_every=500, num_predict=8
)
# ``--quick``: the same pipeline in seconds (tests); the model learns next to nothing.
QUICK_PLAN = DemoPlan(
    num_train=16,
    num_val=6,
    image_size=(64, 96),
    seed=0,
    batch_size=4,
    eval_every=3,
    num_predict=2,
    schedule=(("nr_images_epoch", 16), ("max_epoch", 2), ("warm_iters", 2)),
)


@dataclass
class DemoResult:
    """Where a demo run put its outputs, and what it measured."""

    out_dir: Path
    dataset: SynthDataset
    checkpoint: Path
    metrics: Path
    history: Path
    plot: Path
    predictions: list[Path]
    grid: Path
    stats: dict[str, float]
    trained: bool  # False when an existing checkpoint was reused
    train_seconds: float | None  # wall-clock seconds of training in this run (None: reused)

    def summary(self) -> str:
        lines = [
            f"val mAP@[.5:.95] {self.stats['AP']:.3f}  AP50 {self.stats['AP50']:.3f}  AP75 {self.stats['AP75']:.3f}",
            f"dataset     {self.dataset.root}" + (" (reused)" if self.dataset.skipped else ""),
            f"checkpoint  {self.checkpoint}"
            + ("" if self.trained else " (reused; --retrain to train again)"),
            f"metrics     {self.metrics}",
            f"plot        {self.plot}",
            f"detections  {self.grid} and {len(self.predictions)} images in {self.predictions[0].parent}"
            if self.predictions
            else f"detections  {self.grid}",
            f"try:        python -m atssdet predict --weights {self.checkpoint} --class-agnostic "
            f"--nms-threshold {DRAW_NMS} --draw-threshold {DRAW_SCORE_THRESHOLD} IMAGE ...",
        ]
        return "\n".join(lines)


def demo_config(plan: DemoPlan, *, model: str = DEMO_MODEL) -> ATSSConfig:
    """The preset with the plan's schedule overrides; ``extra["demo"]`` records the plan."""
    if model not in DEMO_PRESETS:
        raise ValueError(f"unknown demo model {model!r}; expected one of {', '.join(DEMO_PRESETS)}")
    cfg = with_overrides(DEMO_PRESETS[model], dict(plan.schedule))
    return dataclasses.replace(cfg, extra={"demo": plan.to_dict()})


def checkpoint_matches(path: Path, cfg: ATSSConfig) -> bool:
    """True when ``path`` is a demo checkpoint trained with ``cfg`` and the same demo plan."""
    from atssdet.convert import CheckpointError, read_checkpoint_config

    if not path.is_file():
        return False
    try:
        saved = read_checkpoint_config(path)
    except (CheckpointError, ValueError, TypeError):
        return False
    return saved is not None and saved == cfg and saved.extra.get("demo") == cfg.extra.get("demo")


def choose_threads(requested: int | None) -> int:
    """Torch CPU threads: ``requested``, else the number of idle cores minus one, at least 1.

    Keeping a core of headroom matters more than the second thread: with two OpenMP threads on a
    2-core machine that also runs other jobs, a training step was 5-20x slower than with one thread
    (threads wait for each other when the OS deschedules one; docs/demo.md). On an idle 2-core
    machine this gives 1 thread, which is what the demo's timing was measured with.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = 0.0
    return max(1, min(torch.get_num_threads(), int(cores - load) - 1 if cores > 2 else 1))


# --------------------------------------------------------------------------------------------------
# The demo


def run_demo(
    out_dir: str | os.PathLike[str] = "runs/demo",
    *,
    plan: DemoPlan = FULL_PLAN,
    retrain: bool = False,
    device: str | torch.device | None = None,
    threads: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Generate (or reuse) the dataset, train (or reuse) the model, evaluate, draw, plot; see the module docstring.

    Args:
        out_dir: output folder (created).
        plan: :data:`FULL_PLAN` (the demo) or :data:`QUICK_PLAN` (a seconds-long smoke run).
        retrain: train even when a matching checkpoint exists.
        device: ``cuda`` if available, else ``cpu``.
        threads: torch CPU threads (default: :func:`choose_threads`).
        num_workers: DataLoader worker processes for training (0: load in the main process).
        progress: progress bars.
    """
    from atssdet.distributed import resolve_device

    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(choose_threads(threads))
    try:
        return _run_demo(Path(out_dir), plan, retrain, dev, num_workers, progress)
    finally:  # a library call must not leave the process single-threaded
        torch.set_num_threads(previous_threads)


def _run_demo(
    out: Path, plan: DemoPlan, retrain: bool, dev: torch.device, num_workers: int, progress: bool
) -> DemoResult:
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(plan)

    def say(msg: str) -> None:
        print(f"atssdet demo: {msg}", flush=True)

    # 1. data (regenerated only when missing or made with other parameters)
    dataset = generate_synthetic_dataset(
        out / "data",
        num_train=plan.num_train,
        num_val=plan.num_val,
        seed=plan.seed,
        image_size=plan.image_size,
        force=True,
        progress=progress,
    )
    if dataset.skipped:
        say(f"reusing the dataset in {dataset.root}")

    # 2. model
    checkpoint = out / CHECKPOINT_NAME
    history_path = out / HISTORY_NAME
    trained = retrain or not checkpoint_matches(checkpoint, cfg) or not history_path.is_file()
    train_seconds: float | None = None
    if trained:
        history, train_seconds = _train(cfg, plan, dataset, out, dev, num_workers, progress, say)
        write_json(history, history_path)
    else:
        say(f"reusing the trained model {checkpoint} (same config; --retrain to train again)")
        history = json.loads(history_path.read_text())

    from atssdet.evaluation import evaluate
    from atssdet.loader import load

    model = load(weights=checkpoint, device=dev)

    # 3. COCO mAP on the val split
    report = evaluate(
        model,
        dataset.val_ann,
        dataset.val_images,
        batch_size=plan.batch_size,
        device=dev,
        out=out / "val_results.json",
        num_workers=1,
        progress=progress,
    )
    metrics = report.to_dict()
    metrics.update(
        {
            "model": DEMO_MODEL,
            "checkpoint": str(checkpoint),
            "dataset": str(dataset.root),
            "plan": plan.to_dict(),
            "train_seconds": history.get("train_seconds"),
            "iterations": history["iteration"][-1] if history["iteration"] else 0,
            "device": str(dev),
            "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        }
    )
    metrics_path = write_json(metrics, out / METRICS_NAME)

    # 4. detections on held-out images
    predictions, grid = _draw_predictions(checkpoint, dataset, plan.num_predict, out, dev)

    # 5. the plot
    minutes = history.get("train_seconds")
    took = f", {minutes / 60:.1f} min" if isinstance(minutes, (int, float)) else ""
    title = (
        f"{DEMO_MODEL} on synthetic shapes: {plan.num_train} train images, batch {plan.batch_size}{took}; "
        f"final val mAP {100 * report.stats['AP']:.1f}"
    )
    plot = plot_history(history, out / PLOT_NAME, title=title)

    return DemoResult(
        out_dir=out,
        dataset=dataset,
        checkpoint=checkpoint,
        metrics=metrics_path,
        history=history_path,
        plot=plot,
        predictions=predictions,
        grid=grid,
        stats=report.stats,
        trained=trained,
        train_seconds=train_seconds,
    )


def write_json(obj: Any, path: Path) -> Path:
    """``obj`` as indented JSON (NaN/inf become null), written atomically."""
    from atssdet.evaluation.report import json_safe

    return atomic_write_json(path, json_safe(obj), indent=1)


def _train(
    cfg: ATSSConfig,
    plan: DemoPlan,
    dataset: SynthDataset,
    out: Path,
    dev: torch.device,
    num_workers: int,
    progress: bool,
    say: Any,
) -> tuple[dict[str, Any], float]:
    """Train from scratch into ``out/train``; copy the final weights to ``out/model.safetensors``."""
    from atssdet.training import train
    from atssdet.training.schedule import total_iterations

    train_dir = out / "train"
    if train_dir.exists():
        shutil.rmtree(train_dir)  # a fresh run: old checkpoints would belong to another config
    iters = total_iterations(cfg, plan.batch_size)
    say(
        f"training {DEMO_MODEL} from scratch: {iters} iterations of {plan.batch_size} images on {dev} "
        f"({torch.get_num_threads()} thread(s))"
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
        checkpoint_every=iters,
        keep_checkpoints=1,
        eval_every=plan.eval_every,
        num_workers=num_workers,
        seed=plan.seed,
        progress=progress,
        data_check="quick",  # the generator just wrote (or verified) every file; no need to decode all
    )
    seconds = time.perf_counter() - t0
    if result.weights is None or not result.weights.is_file():
        raise RuntimeError(f"training stopped before its end (iteration {result.iteration} of {iters})")
    atomic_copy(result.weights, out / CHECKPOINT_NAME)
    say(f"trained in {seconds / 60:.1f} min")
    history: dict[str, Any] = {
        "iteration": [r["iteration"] for r in result.losses],
        "lr": [r["lr"] for r in result.losses],
        "evals": [{"iteration": e["iteration"], "stats": e["stats"]} for e in result.evals],
        "train_seconds": seconds,
        "device": str(dev),
        "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
    }
    for key in LOSS_KEYS:
        history[key] = [r[key] for r in result.losses]
    return history, seconds


def _draw_predictions(
    checkpoint: Path, dataset: SynthDataset, count: int, out: Path, dev: torch.device
) -> tuple[list[Path], Path]:
    """``predict`` on the first ``count`` val images (never trained on); write each drawn image and a grid.

    The pictures use one class-agnostic NMS (IoU :data:`DRAW_NMS`) and a score threshold of
    :data:`DRAW_SCORE_THRESHOLD`, so each object shows its best label once. The COCO evaluation
    uses the config's per-class NMS and 0.05 threshold, as MegEngine does.
    """
    from atssdet.data.coco_schema import load_coco_file
    from atssdet.detector import Detector

    detector = Detector.from_checkpoint(checkpoint, device=dev)
    folder = out / PREDICTIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    files = [
        dataset.val_images / r.file_name for r in load_coco_file(dataset.val_ann).sorted_images()[:count]
    ]
    options = detector.options.replace(
        score_threshold=DRAW_SCORE_THRESHOLD, nms_threshold=DRAW_NMS, class_agnostic=True
    )
    results = detector.predict([str(f) for f in files], options=options)
    paths: list[Path] = []
    drawn: list[np.ndarray] = []
    for file, dets in zip(files, results, strict=True):
        canvas = draw_enlarged(
            read_image(file),
            dets.boxes.cpu().numpy(),
            dets.scores.cpu().numpy(),
            dets.labels.cpu().numpy(),
            detector.cfg.class_names,
        )
        paths.append(write_image(folder / (file.stem + ".png"), canvas))
        drawn.append(canvas)
    grid = write_image(out / GRID_NAME, make_grid(drawn))
    return paths, grid

"""Experiment loggers: ``train --logger tensorboard|mlflow|jsonl`` (several allowed).

``train_log.jsonl`` (:mod:`~atssdet.training.log`) is always written: it is the run's own record.
:class:`LoggerOptions` adds sinks that receive the same numbers on rank 0:

* ``train/loss_cls``, ``train/loss_bbox``, ``train/loss_ctr``, ``train/total_loss``, ``train/lr``,
  ``train/images_per_s`` (global batch / iteration time), ``train/iter_time_s``, ``train/data_time_s``,
  ``train/max_mem_mb`` at every logged iteration (``--log-every``);
* ``val/AP``, ``val/AP50`` ... (the 12 COCO statistics) and ``val_images`` (the first
  ``val_images`` validation images with their detections drawn) at every validation (``--eval-every``);
* the run's settings (batch, device, the config) as parameters (MLflow) or text (TensorBoard).

**TensorBoard**: ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package) into
``OUT/tensorboard/``; ``tensorboard --logdir OUT/tensorboard``. **MLflow**: ``mlflow.MlflowClient``
(``mlflow-skinny`` is enough) with the tracking URI given, else the local folder store
``OUT/mlruns`` (``mlflow ui --backend-store-uri OUT/mlruns``); experiment ``atssdet`` unless named.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from atssdet.errors import OptionError

LOGGERS = ("jsonl", "tensorboard", "mlflow")


@dataclass(frozen=True)
class LoggerOptions:
    """Which sinks, where, and the validation split whose images are drawn."""

    names: tuple[str, ...] = ("jsonl",)
    tracking_uri: str | None = None  # MLflow; None: OUT/mlruns
    experiment: str = "atssdet"
    run_name: str | None = None
    val_images: int = 4
    val: tuple[Any, Any] | None = field(default=None, compare=False)  # (annotations, image folder)

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in LOGGERS]
        if unknown:
            raise OptionError(f"--logger {unknown[0]!r}: expected one of {', '.join(LOGGERS)}")
        if self.val_images < 0:
            raise OptionError(f"--log-val-images must be >= 0, got {self.val_images}")


class Sink(Protocol):
    def params(self, params: dict[str, Any]) -> None: ...
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, step: int, tag: str, rgb: np.ndarray) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise OptionError(
                "--logger tensorboard needs the tensorboard package: pip install 'atssdet[loggers]'"
            ) from exc
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("run", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class MLflowSink:
    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise OptionError(
                "--logger mlflow needs MLflow: pip install 'atssdet[loggers]' (mlflow-skinny)"
            ) from exc
        if tracking_uri.startswith("file:"):
            # MLflow 3 keeps its folder store in "maintenance mode" and refuses it unless asked for: the
            # folder store is what a local run wants (no database server, no SQLAlchemy), so ask for it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.tracking_uri = tracking_uri

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if np.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        self.client.log_image(self.run_id, rgb, f"{tag}/step_{step:08d}.png")

    def close(self, status: str = "FINISHED") -> None:
        """End the run as ``FINISHED``, ``FAILED`` (training raised) or ``KILLED`` (interrupted)."""
        self.client.set_terminated(self.run_id, status=status)


def open_sinks(options: LoggerOptions, out_dir: Path) -> list[Sink]:
    """The sinks of ``options`` (``jsonl`` needs none: :class:`~atssdet.training.log.TrainLog` writes it)."""
    sinks: list[Sink] = []
    if "tensorboard" in options.names:
        sinks.append(TensorBoardSink(out_dir / "tensorboard"))
    if "mlflow" in options.names:
        uri = options.tracking_uri or (out_dir / "mlruns").resolve().as_uri()
        sinks.append(MLflowSink(uri, options.experiment, options.run_name or out_dir.name))
    return sinks


def flat_params(record: dict[str, Any]) -> dict[str, Any]:
    """The start record as flat ``key: value`` parameters (``config.*`` for the config fields)."""
    out = {k: v for k, v in record.items() if k not in ("event", "config")}
    out.update(
        {
            f"config.{k}": json.dumps(v) if isinstance(v, list | dict) else v
            for k, v in record.get("config", {}).items()
        }
    )
    return out


def step_scalars(record: dict[str, Any], global_batch: int) -> dict[str, float]:
    """``train/...`` scalars of one JSONL step record (see the module doc)."""
    from atssdet.criterion import LOSS_KEYS

    values = {f"train/{k}": float(record[k]) for k in LOSS_KEYS if k in record}
    values["train/lr"] = float(record["lr"])
    t = float(record.get("time", 0.0))
    values["train/iter_time_s"] = t
    values["train/data_time_s"] = float(record.get("data_time", 0.0))
    if t > 0:
        values["train/images_per_s"] = global_batch / t
    values["train/max_mem_mb"] = float(record.get("max_mem_mb", float("nan")))
    return values


def drawn_val_images(
    val: tuple[Any, Any], results_path: Path, count: int
) -> list[tuple[str, np.ndarray]]:  # fmt: skip
    """(file name, RGB uint8) of the first ``count`` validation images with their detections drawn."""
    import torch

    from atssdet.data.image_io import ImageReadError, read_image
    from atssdet.evaluation.coco import read_ground_truth
    from atssdet.structures import Detections
    from atssdet.visualize import draw

    if count == 0 or not results_path.is_file():
        return []
    gt = read_ground_truth(val[0])
    results = json.loads(results_path.read_bytes())
    cat_ids = sorted(gt.categories)
    names = tuple(gt.categories[c] for c in cat_ids)
    out = []
    for record in gt.sorted_images()[:count]:
        mine = [r for r in results if r["image_id"] == record.image_id]
        boxes = np.array([r["bbox"] for r in mine], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = np.searchsorted(
            np.array(cat_ids), np.array([r["category_id"] for r in mine], dtype=np.int64)
        )
        det = Detections(torch.from_numpy(boxes), torch.tensor([r["score"] for r in mine], dtype=torch.float32),
                         torch.from_numpy(labels.astype(np.int64)), class_names=names)  # fmt: skip
        try:
            image = read_image(Path(os.fspath(val[1])) / record.file_name)
        except ImageReadError:
            continue
        out.append((record.file_name, np.ascontiguousarray(draw(det, image)[:, :, ::-1])))
    return out


def log_validation(sinks: Sequence[Sink], options: LoggerOptions, out_dir: Path, iteration: int,
                   stats: dict[str, float]) -> None:  # fmt: skip
    """``val/...`` scalars and the drawn validation images of the validation at ``iteration``."""
    for sink in sinks:
        sink.scalars(iteration, {f"val/{k}": v for k, v in stats.items()})
    if options.val is None or not sinks:
        return
    results = out_dir / "eval" / f"iter_{iteration:08d}.results.json"  # where training's validation writes
    for k, (_, rgb) in enumerate(drawn_val_images(options.val, results, options.val_images)):
        for sink in sinks:
            sink.image(iteration, f"val_images/{k}", rgb)

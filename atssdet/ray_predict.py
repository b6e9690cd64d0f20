"""Batch inference on a Ray cluster with Ray Data: :func:`predict_dataset` (``predict --engine ray``).

Ray Data's documented recipe for batch inference of a PyTorch model: a CPU stage that decodes and
resizes (``map_batches`` tasks), then a model stage of actors that each load the model once
(``map_batches`` with a callable class, ``concurrency`` actors, ``num_gpus`` each). Ray Data restarts
an actor that dies and re-runs its batch (its actor defaults, ``max_restarts=-1``,
``max_task_retries=-1``); the caller's sink
keeps one record per key, so a batch that ran twice is still written once.

Ray is an optional extra (``pip install 'atssdet[ray]'``); nothing here imports it before it is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from atssdet.errors import ImageReadError, OptionError

if TYPE_CHECKING:
    from atssdet.detector import Detector
    from atssdet.options import InferenceOptions
    from atssdet.structures import Detections

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'atssdet[ray]' (or: pip install 'ray[data]')"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray job runs: ``address`` (None: ``$RAY_ADDRESS``, else a local Ray),
    ``concurrency`` model actors with ``num_gpus`` each, ``num_cpus`` of a local Ray (None: all).
    A dead actor is restarted and its batch retried by Ray Data's defaults for actors."""

    address: str | None = None
    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: int | None = None


def require_ray() -> Any:
    """The ``ray`` module, or OptionError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise OptionError(INSTALL_HINT) from exc
    return ray


def predict_dataset(
    ds: Any,
    detector: Detector | Callable[[], Detector],
    *,
    options: InferenceOptions | None = None,
    batch_size: int | None = None,
    concurrency: int = 1,
    num_gpus: float = 0.0,
    num_cpus: float | None = None,
) -> Any:
    """A Ray Dataset of detections, one row per row of ``ds``.

    ``ds`` rows hold ``path`` (a local path or any URI pyarrow's file systems open: ``s3://``,
    ``gs://``, ``hdfs://``...), or ``bytes`` (an encoded image, as from ``ray.data.read_binary_files``),
    or ``image`` (BGR uint8 ``[H, W, 3]``); other columns (an ``index``, ids) are passed through.
    ``detector``: a :class:`Detector` (sent to each actor) or a function building one in the actor
    (e.g. ``lambda: Detector.from_pretrained(name, device="cuda")``). Output rows add ``height``,
    ``width``, ``error`` (``""`` or the problem) and ``detections`` (a JSON list of ``{"box", "score",
    "label", "name"}``, as in ``predictions.jsonl``). ``num_cpus`` per actor defaults to what leaves
    one CPU of the cluster to the decoding stage (at most 1): actors holding every CPU would starve it.
    """
    import ray

    if num_cpus is None:
        num_cpus = min(1.0, max(0.1, (float(ray.cluster_resources().get("CPU", 2.0)) - 1.0) / concurrency))
    det = detector if callable(detector) and not hasattr(detector, "iter_predict") else None
    sizes = _sizes(detector) if det is None else None
    decoded = ds.map_batches(
        _decode_batch, fn_kwargs={"sizes": sizes}, batch_format="numpy", zero_copy_batch=True
    )
    return decoded.map_batches(
        _ModelStage,
        fn_constructor_kwargs={"detector": detector, "options": options},
        batch_size=batch_size or 4,
        batch_format="numpy",
        concurrency=concurrency,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
    )  # Ray Data's actor defaults restart a dead actor and retry its batch (max_restarts/max_task_retries -1)


def _sizes(detector: Any) -> tuple[int, int]:
    return int(detector.short_size), int(detector.max_size)


def _decode_batch(batch: dict[str, np.ndarray], sizes: tuple[int, int] | None) -> dict[str, Any]:
    """CPU stage: read/decode each row and resize it (when ``sizes`` are known here)."""
    from atssdet.data.image_io import decode_image, read_image
    from atssdet.data.transforms import resize_shortest_edge

    n = len(next(iter(batch.values())))
    images: list[np.ndarray] = []
    errors: list[str] = []  # "" for none: a column of str (None would not survive Arrow/pandas as None)
    hw: list[tuple[int, int]] = []
    for i in range(n):
        source = str(batch["path"][i]) if "path" in batch else f"<row {i}>"
        try:
            if "image" in batch:
                image = np.asarray(batch["image"][i], dtype=np.uint8)
            elif "bytes" in batch:
                image = decode_image(bytes(batch["bytes"][i]), source=source)
            elif "://" in source:
                image = decode_image(_read_uri(source), source=source)
            else:
                image = read_image(source)
            hw.append((int(image.shape[0]), int(image.shape[1])))
            images.append(resize_shortest_edge(image, *sizes) if sizes is not None else image)
            errors.append("")
        except (ImageReadError, OSError, ValueError) as exc:
            hw.append((0, 0))
            images.append(np.zeros((1, 1, 3), np.uint8))
            errors.append(str(exc) if source in str(exc) else f"{source}: {exc}")
    out = {k: v for k, v in batch.items() if k not in ("bytes", "image")}
    out["pixels"] = _ragged(images)
    out["orig_hw"] = np.asarray(hw, dtype=np.int64).reshape(n, 2)
    out["error"] = np.asarray(errors, dtype=str)
    out["resized"] = np.full(n, sizes is not None)
    return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _read_uri(uri: str) -> bytes:
    """The bytes at ``uri`` through pyarrow's file systems (S3, GCS, HDFS, ...)."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as f:
        return bytes(f.read())


class _ModelStage:
    """A Ray actor: the model, loaded once; detects on the decoded batches it is given."""

    def __init__(self, detector: Any, options: InferenceOptions | None) -> None:
        self.detector = (
            detector() if callable(detector) and not hasattr(detector, "iter_predict") else detector
        )
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from atssdet.data.transforms import resize_shortest_edge

        det = self.detector
        n = len(batch["error"])
        ok = [i for i in range(n) if not batch["error"][i]]
        sources = [str(batch["path"][i]) if "path" in batch else f"<row {i}>" for i in range(n)]
        pixels = [np.asarray(batch["pixels"][i]) for i in ok]
        if ok and not bool(batch["resized"][0]):
            pixels = [resize_shortest_edge(p, det.short_size, det.max_size) for p in pixels]
        results = det.detect_resized(
            pixels,
            [tuple(int(v) for v in batch["orig_hw"][i]) for i in ok],
            options=self.options,
            sources=[sources[i] for i in ok],
        )
        found = dict(zip(ok, results, strict=True))
        dets = [json.dumps(found[i].to_dict()["detections"]) if i in found else "[]" for i in range(n)]
        out = {k: v for k, v in batch.items() if k not in ("pixels", "resized", "orig_hw", "error")}
        out["height"] = np.asarray([int(h) for h, _ in batch["orig_hw"]], dtype=np.int64)
        out["width"] = np.asarray([int(w) for _, w in batch["orig_hw"]], dtype=np.int64)
        errors = [str(batch["error"][i]) if i not in found else (found[i].error or "") for i in range(n)]
        out["error"] = np.asarray(errors, dtype=str)
        out["detections"] = np.asarray(dets, dtype=object)
        return out


def row_detections(row: dict[str, Any], class_names: Sequence[str]) -> Detections:
    """An output row of :func:`predict_dataset` as :class:`Detections`."""
    from atssdet.predict_stream import record_detections

    error = str(row.get("error") or "") or None
    record = {
        "height": int(row["height"]) if error is None else None,
        "width": int(row["width"]),
        "error": error,
        "detections": json.loads(row["detections"]),
    }
    result = record_detections(record, class_names)
    result.source = str(row.get("path", ""))
    return result


def init_ray(ray_options: RayOptions) -> Any:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start a local Ray; a running session is reused."""
    ray = require_ray()
    if not ray.is_initialized():
        address = ray_options.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None and ray_options.num_cpus is not None:
            kwargs["num_cpus"] = ray_options.num_cpus
        ray.init(address=address, **kwargs)
    return ray


def iter_ray_results(
    files: Sequence[str],
    indices: Sequence[int],
    detector: Detector,
    *,
    batch_size: int | None = None,
    options: InferenceOptions | None = None,
    ray: RayOptions | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, Detections]]:
    """``(index, result)`` for each of ``files`` (``indices[i]`` is ``files[i]``'s), as Ray finishes them."""
    if not files:  # all recorded already: no Ray to start
        return
    ray_options = ray or RayOptions()
    ray_module = init_ray(ray_options)
    ray_module.data.DataContext.get_current().enable_progress_bars = progress
    items = [{"index": int(i), "path": str(f)} for i, f in zip(indices, files, strict=True)]
    # Blocks of ~64 images, at least two per actor: one per image costs Ray a task each.
    blocks = min(len(items), max(2 * ray_options.concurrency, len(items) // 64))
    ds = ray_module.data.from_items(items, override_num_blocks=blocks)
    out = predict_dataset(
        ds,
        detector,
        options=options,
        batch_size=batch_size,
        concurrency=ray_options.concurrency,
        num_gpus=ray_options.num_gpus,
    )
    names = detector.cfg.class_names
    for row in out.iter_rows():
        yield int(row["index"]), row_detections(row, names)

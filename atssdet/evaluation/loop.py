"""Run a detector over a COCO-format split, gather the detections, score them: :func:`evaluate`.

Under ``torchrun`` (a joined process group, see :mod:`atssdet.distributed`) the images are sharded
across ranks (``sorted image ids[rank::world_size]``); every rank's detections are gathered on rank 0,
which scores them and writes the files; every rank returns the same :class:`EvalReport`.

Typical use::

    model = atssdet.load("atss_res50_coco_3x_800size", weights="atss_res50.safetensors")
    report = evaluate(model, "annotations/instances_val2017.json", "val2017", batch_size=4,
                      out="runs/eval/res50.results.json")
    report.stats["AP"]
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import nn

from atssdet import distributed, validate
from atssdet.batching import group_by_padded_size
from atssdet.config import ATSSConfig
from atssdet.data.coco_records import CocoFile, DatasetError, ImageRecord
from atssdet.detector import Detector
from atssdet.evaluation.coco import (
    STAT_NAMES,
    detections_to_coco,
    per_class_ap,
    read_ground_truth,
    run_cocoeval,
    stats_from_cocoeval,
)
from atssdet.evaluation.report import EvalReport, write_eval_files
from atssdet.modeling.atss import ATSS
from atssdet.options import InferenceOptions
from atssdet.structures import Detections

# A detector callable: BGR uint8 images [H_i, W_i, 3] -> one Detections per image, boxes in the
# pixels of the image it was given, labels 0..C-1.
DetectFn = Callable[[list[np.ndarray]], list[Detections]]

# detect(images as preprocessed, original (h, w) of each, their file names) -> Detections in original
# pixels (a Detections with ``error`` set: that image failed alone)
_Detect = Callable[[list[np.ndarray], list[tuple[int, int]], list[str]], list[Detections]]
_Resize = Callable[[np.ndarray], np.ndarray]
_HW = Callable[[int, int], tuple[int, int]]


class ModelRunner:
    """Evaluation's view of a :class:`~atssdet.detector.Detector`: resize in loader threads, detect in batches.

    :meth:`preprocess` is the MegEngine eval resize (it runs in loader threads); :meth:`resized_hw`
    plans batches from the annotation's sizes; :meth:`run` is :meth:`Detector.detect_resized`, which
    batches only images of the same padded size, so every image gets exactly
    ``compat.DetEvaluator.predict``'s detections whatever the batch. Unset values come from the
    detector (its :attr:`~atssdet.detector.Detector.options`: the config's ``test_*`` values).
    """

    def __init__(
        self,
        model: nn.Module | Detector,
        *,
        device: torch.device | None = None,
        short_size: int | None = None,
        max_size: int | None = None,
        options: InferenceOptions | None = None,
    ) -> None:
        if isinstance(model, Detector):  # e.g. an exported .onnx file run by ONNX Runtime
            self.detector = copy.copy(model)
            self.detector.short_size = short_size if short_size is not None else model.short_size
            self.detector.max_size = max_size if max_size is not None else model.max_size
        else:
            core = _unwrap(model)
            _config_of(core)
            self.detector = Detector(
                cast(ATSS, core), device=device, short_size=short_size, max_size=max_size
            )
        self.options = options if options is not None else self.detector.options

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """BGR uint8 ``[H, W, 3]`` -> resized ``[h, w, 3]`` (MegEngine's ``cv2.resize`` INTER_LINEAR);
        with ``options.slicing`` the image itself (tiles are cut from it, :mod:`atssdet.slicing`)."""
        if self.options.slicing is not None:
            return image
        from atssdet.data.transforms import resize_shortest_edge

        return resize_shortest_edge(image, self.detector.short_size, self.detector.max_size)

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """The model's input size ``(h, w)`` for an original ``height x width`` image (before padding)."""
        from atssdet.data.transforms import get_hw_by_short_size

        if self.options.slicing is not None:
            return height, width
        return get_hw_by_short_size(height, width, self.detector.short_size, self.detector.max_size)

    def run(
        self, resized: list[np.ndarray], orig_hw: list[tuple[int, int]], sources: list[str] | None = None
    ) -> list[Detections]:
        """One :class:`Detections` per resized image, boxes in original ``(height, width)`` pixels; an
        image whose forward pass runs out of memory gets an error result naming its ``sources`` entry."""
        if self.options.slicing is not None:  # ``resized`` are the originals (see preprocess)
            from atssdet.slicing import detect_sliced_many

            return detect_sliced_many(self.detector, resized, self.options, sources)
        return self.detector.detect_resized(resized, orig_hw, options=self.options, sources=sources)


def _config_of(model: nn.Module) -> ATSSConfig:
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ATSSConfig):
        raise ValueError(
            f"{type(model).__name__} has no ATSSConfig .cfg; pass an ATSS model or a detector callable"
        )
    return cfg


def _unwrap(model: nn.Module) -> nn.Module:
    """The ATSS model inside a DDP/DataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


@dataclass
class _Pipeline:
    """How images are read, planned and run; ``core`` is the module put in eval mode (restored after)."""

    detect: _Detect
    preprocess: _Resize | None = None
    resized_hw: _HW | None = None
    core: nn.Module | None = None
    was_training: bool = False


def _pipeline(
    model: nn.Module | Detector | DetectFn,
    num_categories: int,
    source: str,
    *,
    device: str | torch.device | None,
    short_size: int | None,
    max_size: int | None,
    options: InferenceOptions | None,
) -> _Pipeline:
    """The pipeline of a module (moved to ``device``, default its own; set to eval), a Detector or a callable."""
    if not isinstance(model, Detector | nn.Module):
        fn = model
        return _Pipeline(detect=lambda images, orig_hw, sources: fn(images))
    # A Detector (e.g. an exported .onnx file) runs as it is; a module is moved and set to eval.
    core = None if isinstance(model, Detector) else _unwrap(model)
    num_classes = _config_of(core).num_classes if core is not None else cast(Detector, model).cfg.num_classes
    if num_classes != num_categories:
        raise ValueError(
            f"{source}: has {num_categories} categories but the model predicts {num_classes} classes"
        )
    pipeline = _Pipeline(detect=lambda images, orig_hw, sources: [], core=core)
    dev = None
    if core is not None:
        dev = torch.device(device) if device is not None else next(core.parameters()).device
        core.to(dev)
        pipeline.was_training = core.training
        core.eval()
    model_runner = ModelRunner(
        model if core is None else core,
        device=dev,
        short_size=short_size,
        max_size=max_size,
        options=options,
    )
    pipeline.detect, pipeline.preprocess, pipeline.resized_hw = (
        model_runner.run,
        model_runner.preprocess,
        model_runner.resized_hw,
    )
    return pipeline


_Loaded = tuple[ImageRecord, "np.ndarray | None", "tuple[int, int] | None", "str | None"]


def _read(entry: ImageRecord, image_dir: Path, preprocess: _Resize | None) -> _Loaded:
    """(entry, preprocessed image, original (h, w), None) or (entry, None, None, error message): an
    image that cannot be read or resized (or runs out of memory doing so) fails alone."""
    import cv2

    from atssdet.data.image_io import read_image
    from atssdet.errors import cv2_message, describe_memory_error, is_memory_error

    path = image_dir / entry.file_name
    try:
        image = read_image(path)
    except ValueError as exc:  # ImageReadError
        return entry, None, None, str(exc)
    except MemoryError as exc:
        return entry, None, None, f"{path}: {describe_memory_error(exc)} reading it"
    hw = (int(image.shape[0]), int(image.shape[1]))
    if preprocess is None:
        return entry, image, hw, None
    try:
        return entry, preprocess(image), hw, None
    except (cv2.error, MemoryError, ValueError) as exc:
        problem = describe_memory_error(exc) if is_memory_error(exc) else cv2_message(exc)
        return entry, None, None, f"{path}: cannot resize the {hw[1]}x{hw[0]} image: {problem}"


def _plan_batches(
    entries: list[ImageRecord], batch_size: int, resized_hw: _HW | None
) -> list[list[ImageRecord]]:
    """Chunks of ``batch_size`` entries; with ``resized_hw``, only entries of one padded input size
    (planned from the annotation's sizes) share a chunk, so batching never changes a detection."""
    if resized_hw is None:
        return [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
    groups = group_by_padded_size([resized_hw(e.height, e.width) for e in entries], max_group=batch_size)
    return [[entries[i] for i in group] for group in groups]


def _batches(
    chunks: list[list[ImageRecord]], image_dir: Path, preprocess: _Resize | None, num_workers: int
) -> Iterator[list[_Loaded]]:
    """Read (and resize) each chunk; the next chunk is read in threads while this one runs."""
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:

        def submit(chunk: list[ImageRecord]) -> list[Future]:
            return [pool.submit(_read, e, image_dir, preprocess) for e in chunk]

        pending = submit(chunks[0]) if chunks else []
        for i in range(len(chunks)):
            current = pending
            pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
            yield [f.result() for f in current]


@dataclass
class _ShardResult:
    results: list[dict[str, Any]]  # COCO results entries of this rank's images
    done_ids: list[int]  # image ids evaluated
    failures: list[str]  # "file: reason" per unreadable image


def _run_shard(
    pipeline: _Pipeline,
    entries: list[ImageRecord],
    cat_ids: list[int],
    image_root: Path,
    *,
    batch_size: int,
    num_workers: int,
    bar: Any,
    total: int,
) -> _ShardResult:
    """Detections of this rank's ``entries``; unreadable images are warned about and skipped."""

    def warn(msg: str) -> None:
        write = bar.write if bar is not None else print
        write(f"atssdet eval: warning: {msg}", file=sys.stderr)

    out = _ShardResult([], [], [])
    world = distributed.get_world_size()
    chunks = _plan_batches(entries, batch_size, pipeline.resized_hw)
    for batch in _batches(chunks, image_root, pipeline.preprocess, num_workers):
        ok: list[tuple[ImageRecord, np.ndarray, tuple[int, int]]] = []
        for entry, image, hw, err in batch:
            if image is None or hw is None:
                out.failures.append(str(err))
                warn(f"skipping unreadable image: {err}")
                continue
            if (entry.height, entry.width) != hw:
                warn(
                    f"{entry.file_name}: the annotation file says {entry.height}x{entry.width} but the "
                    f"image is {hw[0]}x{hw[1]}; detections are in the image's pixels"
                )
            ok.append((entry, image, hw))
        if ok:
            names = [str(image_root / e.file_name) for e, _, _ in ok]
            dets = pipeline.detect([im for _, im, _ in ok], [hw for _, _, hw in ok], names)
            for d in dets:
                if not d.ok:  # e.g. out of memory on this image alone: the others are kept
                    out.failures.append(str(d.error))
                    warn(f"skipping image: {d.error}")
            done = [(e, d) for (e, _, _), d in zip(ok, dets, strict=True) if d.ok]
            ids = [e.image_id for e, _ in done]
            out.results.extend(detections_to_coco([d for _, d in done], ids, cat_ids))
            out.done_ids.extend(ids)
        if bar is not None:  # other ranks progress at about the same pace
            bar.update(min(len(batch) * world, total - bar.n))
    return out


def evaluate(
    model: nn.Module | Detector | DetectFn,
    ann_file: str | os.PathLike[str] | COCO,
    image_dir: str | os.PathLike[str],
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    out: str | os.PathLike[str] | None = None,
    short_size: int | None = None,
    max_size: int | None = None,
    options: InferenceOptions | None = None,
    num_workers: int = 2,
    progress: bool = True,
    extra_metrics: dict[str, Any] | None = None,
) -> EvalReport:
    """Run ``model`` over every image of ``ann_file`` (files under ``image_dir``) and score it with COCOeval.

    ``model`` is an ATSS model (an in-memory one from a trainer is fine; a DDP wrapper too: its
    training mode is restored afterwards), a :class:`~atssdet.detector.Detector` (for instance an
    exported ``.onnx`` file: ``Detector.from_checkpoint("m.onnx")``) or a :data:`DetectFn` callable.
    ``device`` defaults to the model's own device; ``options`` (thresholds, top-k) to the model config's
    ``test_*`` values (:meth:`~atssdet.options.InferenceOptions.from_config`). ``ann_file`` is validated by the COCO schema (a
    fatal problem raises :class:`~atssdet.data.coco_records.DatasetError`). Images that cannot be
    read are reported (stderr and ``failed_images``) and skipped; the statistics then cover the
    images that were evaluated. With ``out`` the COCO results JSON is written there and the metrics
    JSON next to it (:func:`~atssdet.evaluation.report.metrics_path_for`), atomically, by rank 0
    only. For a model, batches hold only images of the same padded input size (planned from the
    annotation's sizes), so ``batch_size`` does not change the detections (see :class:`ModelRunner`).
    In a joined process group the images are sharded across ranks and the detections gathered, so
    each image is counted once; call it on every rank (each gets the report).
    """
    validate.check_values(
        batch_size=batch_size,
        short_size=short_size,
        max_size=max_size,
        num_workers=num_workers,
        device=device,
    )
    data = read_ground_truth(ann_file)
    cat_ids = sorted(data.categories)
    entries = data.sorted_images()
    image_root = Path(image_dir)
    if not image_root.is_dir():
        what = "is not a folder" if image_root.exists() else "image folder not found"
        raise FileNotFoundError(f"{image_root}: {what}")
    main = distributed.is_main_process()
    pipeline = _pipeline(
        model,
        len(cat_ids),
        str(ann_file),
        device=device,
        short_size=short_size,
        max_size=max_size,
        options=options,
    )
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=len(entries), desc="eval", unit="img", dynamic_ncols=True)
    try:
        mine = _run_shard(
            pipeline,
            distributed.shard(entries),
            cat_ids,
            image_root,
            batch_size=batch_size,
            num_workers=num_workers,
            bar=bar,
            total=len(entries),
        )
    finally:
        if bar is not None:
            bar.close()
        if pipeline.was_training and pipeline.core is not None:
            pipeline.core.train()

    gathered = distributed.all_gather_object((_pack_results(mine.results), mine.done_ids, mine.failures))
    report: EvalReport | None = None
    if main:
        try:
            report, results = _score(data, gathered, len(entries))
        except Exception as exc:  # an assertion or lookup inside pycocotools: it refused the data
            from atssdet.errors import raised_in

            if not raised_in(exc, "pycocotools"):
                raise
            name = ann_file if not isinstance(ann_file, COCO) else "the ground truth"
            raise DatasetError(f"{name}: pycocotools cannot score it: {type(exc).__name__} {exc}") from exc
        if out is not None:
            source = str(ann_file) if not isinstance(ann_file, COCO) else None
            write_eval_files(
                report,
                results,
                out,
                {"ann_file": source, "image_dir": str(image_root), **(extra_metrics or {})},
            )
    return distributed.broadcast_object(report)  # type: ignore[return-value]


_Gathered = list[tuple[tuple[np.ndarray, np.ndarray], list[int], list[str]]]


def _score(data: CocoFile, gathered: _Gathered, num_entries: int) -> tuple[EvalReport, list[dict[str, Any]]]:
    """(report, all results sorted by image id) from every rank's (packed results, ids, failures)."""
    results = [r for part in gathered for r in _unpack_results(part[0])]
    results.sort(key=lambda r: r["image_id"])  # stable: per-image order kept
    done_ids = sorted(i for part in gathered for i in part[1])
    failures = [f for part in gathered for f in part[2]]
    if len(done_ids) != len(set(done_ids)) or len(done_ids) + len(failures) != num_entries:
        raise RuntimeError(
            f"internal error: {num_entries} images, {len(done_ids)} evaluated, "
            f"{len(failures)} failed, {len(done_ids) - len(set(done_ids))} duplicates"
        )
    if done_ids:
        coco_eval = run_cocoeval(data, results, image_ids=done_ids)
        stats, per_class = stats_from_cocoeval(coco_eval), per_class_ap(coco_eval)
    else:
        stats = {name: -1.0 for name in STAT_NAMES}
        per_class = {data.categories[c]: math.nan for c in sorted(data.categories)}
    report = EvalReport(
        stats=stats,
        per_class_ap=per_class,
        num_images=len(done_ids),
        num_detections=len(results),
        failed_images=failures,
    )
    return report, results


def _pack_results(results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Results as int64 [K, 2] (image id, category id) and float64 [K, 5] (x, y, w, h, score): far
    smaller to gather than pickled dicts, and exact (float32 values, any int64 id)."""
    ids = np.array([(r["image_id"], r["category_id"]) for r in results], dtype=np.int64).reshape(-1, 2)
    values = np.array([(*r["bbox"], r["score"]) for r in results], dtype=np.float64).reshape(-1, 5)
    return ids, values


def _unpack_results(packed: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
    ids, values = packed
    return [
        {"image_id": image_id, "category_id": cat_id, "bbox": row[:4], "score": row[4]}
        for (image_id, cat_id), row in zip(ids.tolist(), values.tolist(), strict=True)
    ]

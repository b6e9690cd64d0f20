"""COCO evaluation: run a detector over a COCO-format split, write the results JSON, score it.

The statistics are pycocotools' official ``COCOeval`` (bbox): the 12 numbers of
``COCOeval.summarize()`` under the names in :data:`STAT_NAMES`, plus a per-class AP table.

Under ``torchrun`` (a joined process group, see :mod:`atssdet.distributed`) :func:`evaluate` shards
the images across ranks (``sorted image ids[rank::world_size]``), gathers every rank's detections on
rank 0, which scores them and writes the files; every rank returns the same :class:`EvalReport`.

Typical use::

    model = atssdet.zoo.load("atss_res50_coco_3x_800size", weights="atss_res50.safetensors")
    report = evaluate(model, "annotations/instances_val2017.json", "val2017", batch_size=4,
                      out="runs/eval/res50.results.json")
    report.stats["AP"]
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from atssdet import distributed
from atssdet.batching import padded_size
from atssdet.config import ATSSConfig
from atssdet.fileio import atomic_write_json
from atssdet.modeling.atss import ATSS
from atssdet.postprocess import Detections
from atssdet.predict import Detector

STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

# What each statistic means (COCOeval.summarize order); used by the docs and ``--help``.
STAT_DEFINITIONS: dict[str, str] = {
    "AP": "AP averaged over IoU 0.50:0.05:0.95, all areas, 100 detections per image",
    "AP50": "AP at IoU 0.50",
    "AP75": "AP at IoU 0.75",
    "APs": "AP for small objects (area < 32^2)",
    "APm": "AP for medium objects (32^2 <= area < 96^2)",
    "APl": "AP for large objects (area >= 96^2)",
    "AR1": "AR with 1 detection per image",
    "AR10": "AR with 10 detections per image",
    "AR100": "AR with 100 detections per image",
    "ARs": "AR100 for small objects",
    "ARm": "AR100 for medium objects",
    "ARl": "AR100 for large objects",
}

# A detector callable: BGR uint8 images [H_i, W_i, 3] -> one Detections per image, boxes in the
# pixels of the image it was given, labels 0..C-1.
DetectFn = Callable[[list[np.ndarray]], list[Detections]]


@dataclass
class EvalReport:
    """What one evaluation produced (identical on every rank)."""

    stats: dict[str, float]  # the 12 COCO statistics (fractions; -1 where no gt of that area exists)
    per_class_ap: dict[str, float]  # category name -> AP@[.5:.95] (nan when the class has no gt)
    num_images: int  # images evaluated (read and run)
    num_detections: int
    failed_images: list[str] = field(default_factory=list)  # "file: reason" per unreadable image
    results_path: str | None = None
    metrics_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# COCO ground truth, results and statistics


def load_coco(gt: str | os.PathLike[str] | COCO) -> COCO:
    """A pycocotools ``COCO`` from a path (quietly; pycocotools prints progress) or the object itself."""
    if isinstance(gt, COCO):
        return gt
    path = Path(gt)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        dataset = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file: {exc}") from exc
    if not isinstance(dataset, dict) or "images" not in dataset or "categories" not in dataset:
        raise ValueError(f"{path}: not a COCO annotation file (needs 'images' and 'categories')")
    dataset.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def category_ids(gt: COCO) -> list[int]:
    """COCO category ids in sorted order: contiguous label ``i`` is ``category_ids(gt)[i]``."""
    return sorted(gt.getCatIds())


def detections_to_coco(
    detections: Sequence[Detections], image_ids: Sequence[int], cat_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results entries (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) for a batch of images.

    ``detections[i]`` belongs to ``image_ids[i]``; labels ``0..C-1`` map to ``cat_ids``. Values are
    the float32 numbers as Python floats (exact round trip through JSON).
    """
    lookup = np.asarray(cat_ids, dtype=np.int64)
    out: list[dict[str, Any]] = []
    for det, image_id in zip(detections, image_ids, strict=True):
        if len(det) == 0:
            continue
        labels = det.labels.detach().cpu().numpy().astype(np.int64)
        if labels.min() < 0 or labels.max() >= len(lookup):
            raise ValueError(
                f"image {image_id}: detection label {int(labels.max())} outside 0..{len(lookup) - 1} "
                f"(the annotation file has {len(lookup)} categories)"
            )
        boxes = det.boxes.detach().float().cpu().numpy()
        xywh = np.concatenate((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), axis=1)
        scores = det.scores.detach().float().cpu().numpy()
        cats = lookup[labels]
        for box, score, cat in zip(xywh.tolist(), scores.tolist(), cats.tolist(), strict=True):
            out.append({"image_id": int(image_id), "category_id": int(cat), "bbox": box, "score": score})
    return out


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as JSON to a temp file in ``path``'s folder, then rename (never half-written)."""
    return atomic_write_json(path, obj)


def write_results(results: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write a COCO results list (loads with ``COCO.loadRes`` unchanged), atomically."""
    return write_json_atomic(results, path)


def _read_json(path: Path, *, missing: str) -> Any:
    """Parsed JSON of ``path``; a missing file or bad JSON raises an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON file: {exc}") from exc


def _load_results(gt: COCO, results: str | os.PathLike[str] | list[dict[str, Any]]) -> COCO:
    if not isinstance(results, list):
        path = Path(results)
        results = _read_json(path, missing="results file not found")
        if not isinstance(results, list):
            raise ValueError(f"{path}: a COCO results file is a JSON list of detections")
    if not results:
        # loadRes cannot take an empty list; an empty detection set scores 0 wherever gt exists.
        dt = COCO()
        dt.dataset = {
            "images": gt.dataset["images"],
            "categories": gt.dataset["categories"],
            "annotations": [],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            dt.createIndex()
        return dt
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes adds keys (id, area, segmentation, iscrowd) to the dicts it gets: give it copies.
        return gt.loadRes([dict(r) for r in results])


def run_cocoeval(
    gt: str | os.PathLike[str] | COCO,
    results: str | os.PathLike[str] | list[dict[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
) -> COCOeval:
    """pycocotools ``COCOeval`` (bbox) after evaluate/accumulate/summarize, output silenced.

    ``image_ids`` restricts the evaluation to those images (default: all images of ``gt``).
    """
    coco_gt = load_coco(gt)
    coco_dt = _load_results(coco_gt, results)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def stats_from_cocoeval(coco_eval: COCOeval) -> dict[str, float]:
    """The 12 summary numbers of a summarised ``COCOeval`` by name (see :data:`STAT_NAMES`)."""
    return {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}


def per_class_ap(coco_eval: COCOeval) -> dict[str, float]:
    """AP@[.5:.95] (all areas, 100 dets) per category name, from ``eval['precision']`` ``[T, R, K, A, M]``."""
    precision = coco_eval.eval["precision"]
    gt = coco_eval.cocoGt
    out: dict[str, float] = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[str(gt.cats[cat_id]["name"])] = float(np.mean(p)) if p.size else math.nan
    return out


def coco_stats(
    gt: str | os.PathLike[str] | COCO,
    results: str | os.PathLike[str] | list[dict[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """The 12 COCO bbox statistics (official ``COCOeval``) of ``results`` (list or JSON path) against ``gt``."""
    return stats_from_cocoeval(run_cocoeval(gt, results, image_ids=image_ids))


# --------------------------------------------------------------------------------------------------
# Running a detector over a split


@dataclass(frozen=True)
class ImageEntry:
    image_id: int
    file_name: str
    height: int
    width: int


def image_entries(gt: COCO) -> list[ImageEntry]:
    """Images of the annotation file sorted by id (ids come from the JSON, never from file names)."""
    entries = []
    for image_id in sorted(gt.getImgIds()):
        img = gt.imgs[image_id]
        if "file_name" not in img:
            raise ValueError(f"image id {image_id}: annotation entry has no 'file_name'")
        entries.append(
            ImageEntry(
                int(image_id), str(img["file_name"]), int(img.get("height", 0)), int(img.get("width", 0))
            )
        )
    return entries


class ModelRunner:
    """Evaluation's view of a :class:`~atssdet.predict.Detector`: resize in loader threads, detect in batches.

    :meth:`preprocess` is the MegEngine eval resize (it runs in loader threads); :meth:`batch_key`
    plans batches from the annotation's sizes; :meth:`run` is :meth:`Detector.detect_resized`, which
    batches only images of the same padded size, so every image gets exactly
    ``compat.DetEvaluator.predict``'s detections whatever the batch. Unset values come from ``model.cfg``.
    """

    def __init__(
        self,
        model: nn.Module | Detector,
        *,
        device: torch.device | None = None,
        short_size: int | None = None,
        max_size: int | None = None,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> None:
        if isinstance(model, Detector):  # e.g. an exported .onnx file run by ONNX Runtime
            self.detector = copy.copy(model)
            self.detector.short_size = short_size or model.short_size
            self.detector.max_size = max_size or model.max_size
        else:
            core = _unwrap(model)
            _config_of(core)
            self.detector = Detector(
                cast(ATSS, core), device=device, short_size=short_size, max_size=max_size
            )
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """BGR uint8 ``[H, W, 3]`` -> resized ``[h, w, 3]`` (MegEngine's ``cv2.resize`` INTER_LINEAR)."""
        from atssdet.data.transforms import resize_shortest_edge

        return resize_shortest_edge(image, self.detector.short_size, self.detector.max_size)

    def batch_key(self, height: int, width: int) -> tuple[int, int]:
        """Padded input size of an original ``height x width`` image: images with equal keys batch together."""
        from atssdet.data.transforms import get_hw_by_short_size

        return padded_size(
            *get_hw_by_short_size(height, width, self.detector.short_size, self.detector.max_size)
        )

    def run(self, resized: list[np.ndarray], orig_hw: list[tuple[int, int]]) -> list[Detections]:
        """One :class:`Detections` per resized image, boxes in original ``(height, width)`` pixels."""
        return self.detector.detect_resized(
            resized,
            orig_hw,
            score_threshold=self.score_threshold,
            nms_threshold=self.nms_threshold,
            max_detections=self.max_detections,
        )


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


_Loaded = tuple[ImageEntry, "np.ndarray | None", "tuple[int, int] | None", "str | None"]


def _read(
    entry: ImageEntry, image_dir: Path, preprocess: Callable[[np.ndarray], np.ndarray] | None
) -> _Loaded:
    """(entry, resized image, original (h, w), None) or (entry, None, None, error message)."""
    from atssdet.data.image_io import ImageReadError, read_image

    try:
        image = read_image(image_dir / entry.file_name)
    except ImageReadError as exc:
        return entry, None, None, str(exc)
    hw = (int(image.shape[0]), int(image.shape[1]))
    return entry, (preprocess(image) if preprocess is not None else image), hw, None


def _plan_batches(
    entries: list[ImageEntry], batch_size: int, key: Callable[[int, int], tuple[int, int]] | None
) -> list[list[ImageEntry]]:
    """Chunks of ``batch_size`` entries; with ``key`` (from the annotation's sizes) same-key entries only."""
    if key is None or not all(e.height and e.width for e in entries):
        return [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
    buckets: dict[tuple[int, int], list[ImageEntry]] = {}
    for e in entries:
        buckets.setdefault(key(e.height, e.width), []).append(e)
    return [b[i : i + batch_size] for b in buckets.values() for i in range(0, len(b), batch_size)]


def _batches(
    chunks: list[list[ImageEntry]],
    image_dir: Path,
    preprocess: Callable[[np.ndarray], np.ndarray] | None,
    num_workers: int,
) -> Iterator[list[_Loaded]]:
    """Read (and resize) each chunk; the next chunk is read in threads while this one runs."""
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:

        def submit(chunk: list[ImageEntry]) -> list[Future]:
            return [pool.submit(_read, e, image_dir, preprocess) for e in chunk]

        pending = submit(chunks[0]) if chunks else []
        for i in range(len(chunks)):
            current = pending
            pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
            yield [f.result() for f in current]


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
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    max_detections: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    extra_metrics: dict[str, Any] | None = None,
) -> EvalReport:
    """Run ``model`` over every image of ``ann_file`` (files under ``image_dir``) and score it with COCOeval.

    ``model`` is an ATSS model (an in-memory one from a trainer is fine; a DDP wrapper too: its
    training mode is restored afterwards), a :class:`~atssdet.predict.Detector` (for instance an
    exported ``.onnx`` file: ``Detector.from_checkpoint("m.onnx")``) or a :data:`DetectFn` callable. ``device`` defaults to the
    model's own device. Images that cannot be read are reported (stderr and ``failed_images``) and
    skipped; the statistics then cover the images that were evaluated. With ``out`` the COCO results
    JSON is written there and the metrics JSON next to it (:func:`metrics_path_for`), atomically, by
    rank 0 only. For a model, batches hold only images of the same padded input size (planned from
    the annotation's sizes), so ``batch_size`` does not change the detections (see
    :class:`ModelRunner`). In a joined process group the images are sharded across ranks and the
    detections gathered, so each image is counted once; call it on every rank (each gets the report).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    coco_gt = load_coco(ann_file)
    cat_ids = category_ids(coco_gt)
    entries = image_entries(coco_gt)
    image_root = Path(image_dir)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image folder not found")
    main = distributed.is_main_process()
    my_entries = distributed.shard(entries)

    was_training: bool | None = None
    core: nn.Module | None = None  # the ATSS module evaluated (not for a Detector or a callable)
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None
    batch_key: Callable[[int, int], tuple[int, int]] | None = None
    detect: Callable[[list[np.ndarray], list[tuple[int, int]]], list[Detections]]
    if isinstance(model, Detector | nn.Module):
        # A Detector (e.g. an exported .onnx file) runs as it is; a module is moved and set to eval.
        if isinstance(model, Detector):
            num_classes = model.cfg.num_classes
        else:
            core = _unwrap(model)
            num_classes = _config_of(core).num_classes
        if num_classes != len(cat_ids):
            raise ValueError(
                f"{ann_file}: has {len(cat_ids)} categories but the model predicts {num_classes} classes"
            )
        dev = None
        if core is not None:
            dev = torch.device(device) if device is not None else next(core.parameters()).device
            core.to(dev)
            was_training = core.training
            core.eval()
        runner = ModelRunner(
            model if core is None else core,
            device=dev,
            short_size=short_size,
            max_size=max_size,
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            max_detections=max_detections,
        )
        preprocess, batch_key, detect = runner.preprocess, runner.batch_key, runner.run
    else:
        fn = model

        def detect(images: list[np.ndarray], orig_hw: list[tuple[int, int]]) -> list[Detections]:
            return fn(images)

    results: list[dict[str, Any]] = []
    failures: list[str] = []
    done_ids: list[int] = []
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=len(entries), desc="eval", unit="img", dynamic_ncols=True)

    def warn(msg: str) -> None:
        if bar is not None:
            bar.write(f"atssdet eval: warning: {msg}", file=sys.stderr)
        else:
            print(f"atssdet eval: warning: {msg}", file=sys.stderr)

    world = distributed.get_world_size()
    try:
        chunks = _plan_batches(my_entries, batch_size, batch_key)
        for batch in _batches(chunks, image_root, preprocess, num_workers):
            ok: list[tuple[ImageEntry, np.ndarray, tuple[int, int]]] = []
            for entry, image, hw, err in batch:
                if image is None or hw is None:
                    failures.append(str(err))
                    warn(f"skipping unreadable image: {err}")
                    continue
                if entry.height and entry.width and (entry.height, entry.width) != hw:
                    warn(
                        f"{entry.file_name}: the annotation file says {entry.height}x{entry.width} but the "
                        f"image is {hw[0]}x{hw[1]}; detections are in the image's pixels"
                    )
                ok.append((entry, image, hw))
            if ok:
                dets = detect([im for _, im, _ in ok], [hw for _, _, hw in ok])
                ids = [e.image_id for e, _, _ in ok]
                results.extend(detections_to_coco(dets, ids, cat_ids))
                done_ids.extend(ids)
            if bar is not None:  # other ranks progress at about the same pace
                bar.update(min(len(batch) * world, len(entries) - bar.n))
    finally:
        if bar is not None:
            bar.close()
        if was_training and core is not None:
            core.train()

    # Detections travel as one float64 array per rank ([K, 7]: image id, category id, x, y, w, h,
    # score; exact for float32 values and ids < 2^53), far smaller than pickled dicts.
    gathered = distributed.all_gather_object((_pack_results(results), done_ids, failures))
    report: EvalReport | None = None
    if main:
        all_results = [r for part in gathered for r in _unpack_results(part[0])]
        all_results.sort(key=lambda r: r["image_id"])  # stable: per-image order kept
        all_ids = sorted(i for part in gathered for i in part[1])
        all_failures = [f for part in gathered for f in part[2]]
        if len(all_ids) != len(set(all_ids)) or len(all_ids) + len(all_failures) != len(entries):
            raise RuntimeError(
                f"internal error: {len(entries)} images, {len(all_ids)} evaluated, "
                f"{len(all_failures)} failed, {len(all_ids) - len(set(all_ids))} duplicates"
            )
        if all_ids:
            coco_eval = run_cocoeval(coco_gt, all_results, image_ids=all_ids)
            stats = stats_from_cocoeval(coco_eval)
            per_class = per_class_ap(coco_eval)
        else:
            stats = {name: -1.0 for name in STAT_NAMES}
            per_class = {str(coco_gt.cats[c]["name"]): math.nan for c in cat_ids}
        report = EvalReport(
            stats=stats,
            per_class_ap=per_class,
            num_images=len(all_ids),
            num_detections=len(all_results),
            failed_images=all_failures,
        )
        if out is not None:
            results_path = write_results(all_results, out)
            metrics_path = metrics_path_for(results_path)
            report.results_path = str(results_path)
            report.metrics_path = str(metrics_path)
            metrics = report.to_dict()
            metrics["ann_file"] = str(ann_file) if not isinstance(ann_file, COCO) else None
            metrics["image_dir"] = str(image_root)
            metrics.update(extra_metrics or {})
            write_json_atomic(_json_safe(metrics), metrics_path)
    return distributed.broadcast_object(report)  # type: ignore[return-value]


def _pack_results(results: list[dict[str, Any]]) -> np.ndarray:
    packed = np.zeros((len(results), 7), dtype=np.float64)
    for i, r in enumerate(results):
        packed[i] = (r["image_id"], r["category_id"], *r["bbox"], r["score"])
    return packed


def _unpack_results(packed: np.ndarray) -> list[dict[str, Any]]:
    return [
        {
            "image_id": int(row[0]),
            "category_id": int(row[1]),
            "bbox": row[2:6].tolist(),
            "score": float(row[6]),
        }
        for row in packed
    ]


def metrics_path_for(results_path: str | os.PathLike[str]) -> Path:
    """``x.results.json`` -> ``x.metrics.json``; any other ``x.json`` -> ``x.metrics.json``."""
    p = Path(results_path)
    name = p.name
    for suffix in (".results.json", ".json"):
        if name.endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".metrics.json")
    return p.with_name(name + ".metrics.json")


def _json_safe(obj: Any) -> Any:
    """NaN -> None so the metrics file is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Several checkpoints, tables


def expand_checkpoints(
    patterns: Sequence[str], *, start_epoch: int | None = None, end_epoch: int | None = None
) -> list[Path]:
    """Checkpoint paths from ``patterns``: plain paths, globs (sorted naturally), and ``{epoch}`` templates.

    A pattern containing ``{epoch}`` is expanded for every epoch in ``start_epoch..end_epoch``
    (inclusive, like the seed's ``-se/-ee``); missing files raise FileNotFoundError naming them.
    """
    out: list[Path] = []
    for pattern in patterns:
        if "{epoch}" in pattern:
            if start_epoch is None or end_epoch is None:
                raise ValueError(f"{pattern}: an {{epoch}} pattern needs --start-epoch and --end-epoch")
            if end_epoch < start_epoch:
                raise ValueError(f"--end-epoch {end_epoch} is before --start-epoch {start_epoch}")
            paths = [Path(pattern.format(epoch=e)) for e in range(start_epoch, end_epoch + 1)]
        elif glob.has_magic(pattern):
            paths = [Path(p) for p in sorted(glob.glob(pattern), key=_natural_key)]
            if not paths:
                raise FileNotFoundError(f"{pattern}: no checkpoint matches")
        else:
            paths = [Path(pattern)]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: checkpoint not found")
        out.extend(paths)
    return out


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def checkpoint_label(path: str | os.PathLike[str]) -> str:
    """A short name for a checkpoint or metrics/results file (file name without its suffixes)."""
    name = Path(path).name
    for suffix in (
        ".metrics.json",
        ".results.json",
        ".json",
        ".safetensors",
        ".pkl.gz",
        ".pkl",
        ".pth",
        ".pt",
    ):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_metrics(
    path: str | os.PathLike[str], *, gt: str | os.PathLike[str] | COCO | None = None
) -> dict[str, float]:
    """The 12 statistics from a metrics JSON (written by :func:`evaluate`) or a results JSON (needs ``gt``)."""
    p = Path(path)
    data = _read_json(p, missing="no such file")
    if isinstance(data, dict) and isinstance(data.get("stats"), dict):
        stats = data["stats"]
        missing = [n for n in STAT_NAMES if n not in stats]
        if missing:
            raise ValueError(f"{p}: metrics file lacks {', '.join(missing)}")
        return {n: float(stats[n]) for n in STAT_NAMES}
    if isinstance(data, list):
        if gt is None:
            raise ValueError(f"{p}: is a COCO results file; pass the annotation file (--data) to score it")
        return coco_stats(gt, data)
    raise ValueError(f"{p}: neither an atssdet metrics file nor a COCO results list")


def format_stats_table(rows: Sequence[tuple[str, dict[str, float]]], *, digits: int = 1) -> str:
    """Markdown table, one row per (name, stats), the 12 statistics in percent as columns (seed's ``test_in_table``)."""
    header = "| name | " + " | ".join(STAT_NAMES) + " |"
    rule = "|---|" + "|".join("---:" for _ in STAT_NAMES) + "|"
    lines = [header, rule]
    for name, stats in rows:
        cells = [_pct(stats.get(n, math.nan), digits) for n in STAT_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_per_class_table(per_class: dict[str, float], *, columns: int = 3, digits: int = 1) -> str:
    """Markdown table of per-class AP in percent, ``columns`` (class, AP) pairs per row."""
    items = list(per_class.items())
    header = "| " + " | ".join(["class | AP"] * columns) + " |"
    rule = "|" + "|".join(["---|---:"] * columns) + "|"
    lines = [header, rule]
    for i in range(0, len(items), columns):
        cells = []
        for j in range(columns):
            if i + j < len(items):
                name, ap = items[i + j]
                cells += [name, _pct(ap, digits)]
            else:
                cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stats(stats: dict[str, float]) -> str:
    """The 12 statistics one per line, as ``COCOeval.summarize`` lists them (fractions, 3 decimals)."""
    return "\n".join(f"{name:>6} = {stats[name]:.3f}   {STAT_DEFINITIONS[name]}" for name in STAT_NAMES)


def _pct(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value) or value < 0:
        return "-"
    return f"{100.0 * value:.{digits}f}"

"""COCO ground truth, results and statistics: pycocotools' official ``COCOeval`` (bbox).

The ground truth always goes through :mod:`atssdet.data.coco_schema` (the rules of the reader and
``data check``); the pycocotools ``COCO`` index is then built from the validated entries, never from
a second parse. :func:`detections_to_coco` is the one conversion of detections to COCO results.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from atssdet.data.coco_records import CocoFile, gc_paused
from atssdet.data.coco_schema import load_coco_file, validate_coco
from atssdet.data.formats.common import ForeignDataset
from atssdet.postprocess import Detections

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

# Ground truth: an annotation file, or a pycocotools COCO object (its .dataset is validated too).
GroundTruth: TypeAlias = "str | os.PathLike[str] | COCO"


def read_ground_truth(gt: GroundTruth | CocoFile) -> CocoFile:
    """The validated annotation file; a fatal problem raises :class:`~atssdet.data.coco_records.DatasetError`."""
    if isinstance(gt, CocoFile):
        return gt.raise_if_fatal()
    if isinstance(gt, ForeignDataset):  # a YOLO / VOC / CVAT split, read into the same structure
        return gt.coco(max_examples=1, warnings=False).raise_if_fatal()
    if isinstance(gt, COCO):
        return validate_coco(
            gt.dataset, "<pycocotools COCO object>", max_examples=1, warnings=False
        ).raise_if_fatal()
    return load_coco_file(gt)


def to_pycocotools(data: CocoFile) -> COCO:
    """A pycocotools ``COCO`` index of validated ground truth (quietly; pycocotools prints progress).

    Annotations keep their JSON order, boxes and areas; they are numbered 1..K (the bbox evaluation
    never reads gt ids, and the file's own may repeat or be missing), a missing ``area`` becomes
    ``w * h`` and a missing ``iscrowd`` 0, as COCOeval needs both.
    """
    with gc_paused():  # ~10 small objects per annotation, none in a reference cycle
        return _build_pycocotools(data)


def _build_pycocotools(data: CocoFile) -> COCO:
    table = data.annotations
    areas = np.where(np.isnan(table.areas), table.boxes_xywh[:, 2] * table.boxes_xywh[:, 3], table.areas)
    columns = zip(
        table.image_ids.tolist(),
        table.category_ids.tolist(),
        table.boxes_xywh.tolist(),
        areas.tolist(),
        table.iscrowd.astype(int).tolist(),
        strict=True,
    )
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": r.image_id, "file_name": r.file_name, "height": r.height, "width": r.width}
            for r in data.images.values()
        ],
        "categories": [{"id": k, "name": name} for k, name in data.categories.items()],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": z}
            for k, (i, c, b, a, z) in enumerate(columns)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_ground_truth(gt: GroundTruth | CocoFile) -> COCO:
    """:func:`read_ground_truth` then :func:`to_pycocotools`."""
    return to_pycocotools(read_ground_truth(gt))


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


def read_json(path: Path, *, missing: str) -> Any:
    """Parsed JSON of a results or metrics file; a missing file or bad JSON raises an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: not a JSON file: {exc}") from exc


def _load_results(gt: COCO, results: str | os.PathLike[str] | list[dict[str, Any]]) -> COCO:
    if not isinstance(results, list):
        path = Path(results)
        results = read_json(path, missing="results file not found")
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
    gt: GroundTruth | CocoFile,
    results: str | os.PathLike[str] | list[dict[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
) -> COCOeval:
    """pycocotools ``COCOeval`` (bbox) after evaluate/accumulate/summarize, output silenced.

    ``gt``: an annotation file, a ``COCO`` object or a :class:`CocoFile` (see :func:`read_ground_truth`).
    ``image_ids`` restricts the evaluation to those images (default: all images of ``gt``).
    """
    coco_gt = load_ground_truth(gt)
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
    gt: GroundTruth | CocoFile,
    results: str | os.PathLike[str] | list[dict[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """The 12 COCO bbox statistics (official ``COCOeval``) of ``results`` (list or JSON path) against ``gt``."""
    return stats_from_cocoeval(run_cocoeval(gt, results, image_ids=image_ids))

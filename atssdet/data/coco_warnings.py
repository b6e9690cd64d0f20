"""The warning passes of the COCO schema: data that loads but is probably wrong.

Run by :mod:`atssdet.data.coco_schema` after validation, on the valid entries only; the verdict
(fatal or not) never depends on them, so the strict reader skips them. Vectorised: counts over
COCO train2017 take milliseconds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from atssdet.data.coco_records import AnnotationTable, BoxStatus, ImageRecord, ProblemLog, is_int, short


def file_name_warnings(images: dict[int, ImageRecord], log: ProblemLog) -> None:
    """File names shared by several images, or pointing outside the image folder."""
    names: Counter[str] = Counter(r.file_name for r in images.values())
    for record in images.values():
        if record.file_name[0] == "/" or ".." in record.file_name:  # cheap test first, then the real one
            path = Path(record.file_name)
            if path.is_absolute() or ".." in path.parts:
                log.add("file_outside_image_dir", f"image id {record.image_id}", repr(record.file_name))
    for name, n in names.items():
        if n > 1:
            log.add("duplicate_file_name", "", f"{name!r} x{n}")


def annotation_warnings(
    table: AnnotationTable,
    anns_raw: list[Any],
    images: dict[int, ImageRecord],
    categories: dict[int, str],
    log: ProblemLog,
) -> None:
    """Annotation ids, box statuses, images left without a training box and unused categories."""
    _id_warnings(anns_raw, log)
    _box_warnings(table, anns_raw, images, log)
    _image_warnings(table, images, log)
    boxes_per_category = Counter(table.category_ids[table.trainable].tolist())
    for cat_id in sorted(categories):
        if boxes_per_category[cat_id] == 0:
            log.add("unused_category", "", f"category id {cat_id} {short(categories[cat_id])}")


def _id_warnings(anns_raw: list[Any], log: ProblemLog) -> None:
    ids: list[Any] = [a.get("id") if type(a) is dict else None for a in anns_raw]
    if set(map(type, ids)) <= {int} and len(set(ids)) == len(ids):
        return
    seen: set[int] = set()
    for i, (ann, ann_id) in enumerate(zip(anns_raw, ids, strict=True)):
        if not isinstance(ann, dict):
            continue  # malformed: already fatal
        if not is_int(ann_id):
            log.add("missing_annotation_id", f"annotations[{i}]", f"id {short(ann_id)}")
        elif ann_id in seen:
            detail = f"duplicate annotation id {ann_id}"
            log.add(
                "duplicate_annotation_id",
                f"annotations[{i}]",
                detail,
                example=f"annotation id {ann_id} (annotations[{i}])",
            )
        else:
            seen.add(ann_id)


def _log_rows(log: ProblemLog, code: str, rows: np.ndarray, describe: Any) -> None:
    """Log ``len(rows)`` problems ``code``; only the first ``log.max_examples`` are described."""
    shown = rows[: log.max_examples].tolist()
    for j, row in enumerate(shown):
        where, detail = describe(row)
        log.add(code, where, detail, count=1 if j < len(shown) - 1 else len(rows) - j)


def _box_warnings(
    table: AnnotationTable, anns_raw: list[Any], images: dict[int, ImageRecord], log: ProblemLog
) -> None:
    def describe(row: int, *, size: bool = False) -> tuple[str, str]:
        index = int(table.entry_index[row])
        ann_id = anns_raw[index].get("id")
        name = f"annotation id {ann_id}" if is_int(ann_id) else f"annotations[{index}]"
        image = images[int(table.image_ids[row])]
        detail = f"bbox {short(anns_raw[index]['bbox'])}"
        if size:
            detail += f" vs image {image.width}x{image.height} (WxH)"
        return f"{name} (image {image.image_id})", detail

    for code, status, size in (
        ("degenerate_box", BoxStatus.DEGENERATE, False),
        ("box_outside_image", BoxStatus.OUTSIDE, True),
        ("box_partly_outside", BoxStatus.PARTLY_OUTSIDE, True),
    ):
        rows = np.flatnonzero(table.status == status)
        _log_rows(log, code, rows, lambda row, size=size: describe(row, size=size))


def _image_warnings(table: AnnotationTable, images: dict[int, ImageRecord], log: ProblemLog) -> None:
    """Images without any annotation, with crowd boxes only, or with no training box (JSON order)."""
    keys = np.fromiter(images, np.int64, len(images))
    order = np.argsort(keys)
    at = order[np.searchsorted(keys[order], table.image_ids)] if len(keys) else np.zeros(0, np.int64)
    n = len(keys)
    annotated = np.bincount(at, minlength=n) > 0
    trained = np.bincount(at[table.trainable], minlength=n) > 0
    crowded = np.bincount(at[table.iscrowd], minlength=n) > 0
    records = list(images.values())

    def describe(row: int) -> tuple[str, str]:
        return f"image id {records[row].image_id}", repr(records[row].file_name)

    _log_rows(log, "empty_image", np.flatnonzero(~annotated), describe)
    _log_rows(log, "crowd_only_image", np.flatnonzero(annotated & ~trained & crowded), describe)
    _log_rows(log, "no_valid_box_image", np.flatnonzero(annotated & ~trained & ~crowded), describe)

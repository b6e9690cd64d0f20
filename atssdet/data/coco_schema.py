"""The one validation of a COCO ``instances`` file, shared by the reader, ``data check`` and ``eval``.

:func:`read_coco_file` reads the JSON as bytes (a UTF-8 BOM is fine; a file over :data:`MAX_FILE_BYTES`
or nested deeper than the JSON parser's recursion limit is refused) and checks every field the
library reads:

* ``images``: objects with an ``id`` (an integer within int64), a non-empty string ``file_name`` and
  integer ``height``/``width`` in ``1 .. 2**31 - 1``; ids unique;
* ``categories``: objects with an ``id`` (an integer within int64) and a string ``name``; ids and
  names unique; at least one;
* ``annotations`` (optional, e.g. test-dev has none): objects whose ``image_id``/``category_id`` name a
  listed image/category, ``bbox`` four finite numbers ``[x, y, w, h]``, optional ``iscrowd`` 0 or 1
  and optional finite ``area``. Other keys (``segmentation``, ...) are not read.

Booleans are never numbers or ids (JSON ``true`` is not ``1``). Nothing raises on bad data: the
:class:`CocoFile` returned holds the valid entries and every problem, each of a kind in
:data:`SCHEMA_PROBLEMS` with a fixed severity. ``fatal``: the file cannot be used as it is (the
reader and ``eval`` refuse it through :meth:`CocoFile.raise_if_fatal`, naming the file and the first
such entry; ``data check`` lists them all). ``warning``: it loads, but something is probably wrong.

Which boxes are training targets is decided once, by :func:`~atssdet.data.coco_records.box_status`:
MegEngine's filter (``iscrowd == 0``, ``w > 0``, ``h > 0`` on the JSON values), then xywh -> xyxy in
float32; a box still empty in float32 (e.g. ``w = 1e-30``) or without overlap with its image is
degenerate too (it can never be assigned a point).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from atssdet.data.coco_records import (
    AnnotationTable,
    CocoFile,
    ImageRecord,
    ProblemLog,
    Severity,
    box_status,
    field_problem,
    finite,
    gc_paused,
    is_id,
    is_int,
    short,
)
from atssdet.data.coco_warnings import annotation_warnings, file_name_warnings

MAX_FILE_BYTES = 8 * 2**30  # parsing more would need tens of GiB of memory: surely the wrong file
_MAX_SIDE = 2**31

# code -> (severity, description), in report order.
SCHEMA_PROBLEMS: dict[str, tuple[Severity, str]] = {
    "unreadable_annotation_file": (
        "fatal",
        "annotation file missing, unreadable, too large or not valid JSON",
    ),
    "bad_structure": ("fatal", "top-level structure is wrong (not an object, key missing or not a list)"),
    "malformed_category": ("fatal", "category entry malformed (needs 64-bit integer 'id' and string 'name')"),
    "duplicate_category_id": ("fatal", "duplicate category id"),
    "duplicate_category_name": ("fatal", "duplicate category name (class names must be unique)"),
    "no_categories": ("fatal", "no categories"),
    "malformed_image": (
        "fatal",
        "image entry malformed (needs 64-bit integer 'id', 'file_name', positive 'height'/'width')",
    ),
    "duplicate_image_id": ("fatal", "duplicate image id"),
    "malformed_annotation": (
        "fatal",
        "annotation entry malformed (needs 'image_id', 'category_id', 'bbox' [x, y, w, h], 'iscrowd' 0/1, "
        "numeric 'area')",
    ),
    "nonfinite_box": ("fatal", "box holds NaN or inf"),
    "unknown_image_id": ("fatal", "annotation refers to an image id not in 'images'"),
    "unknown_category_id": ("fatal", "annotation refers to a category id not in 'categories'"),
    "degenerate_box": (
        "warning",
        "box with zero or negative width/height, also in float32 (ignored by training)",
    ),
    "box_outside_image": ("warning", "box entirely outside its image (ignored by training)"),
    "box_partly_outside": ("warning", "box extends beyond its image border (kept unclipped)"),
    "crowd_only_image": ("warning", "image whose only boxes are crowd boxes (skipped by training)"),
    "empty_image": ("warning", "image without any annotation (skipped by training)"),
    "no_valid_box_image": (
        "warning",
        "image whose annotations are all degenerate or outside (skipped by training)",
    ),
    "duplicate_annotation_id": ("warning", "duplicate annotation id (other COCO tools keep only one)"),
    "missing_annotation_id": ("warning", "annotation without an integer 'id' (other COCO tools need one)"),
    "duplicate_file_name": ("warning", "several image entries share a file name"),
    "file_outside_image_dir": ("warning", "file_name is absolute or climbs out of the image folder ('..')"),
    "unused_category": ("warning", "category without any valid box"),
    "no_annotations_key": ("warning", "no 'annotations' key (an unlabelled split, e.g. test-dev)"),
}


def load_coco_file(path: str | os.PathLike[str]) -> CocoFile:
    """:func:`read_coco_file`, raising :class:`DatasetError` at a fatal problem (what the reader and eval use)."""
    return read_coco_file(path, max_examples=1, warnings=False).raise_if_fatal()


def read_coco_file(path: str | os.PathLike[str], *, max_examples: int = 5, warnings: bool = True) -> CocoFile:
    """Read and validate a COCO instances JSON file; never raises on bad data (see the module doc).

    ``warnings=False`` skips the warning-only passes (the verdict does not depend on them).
    """
    log = ProblemLog(SCHEMA_PROBLEMS, max_examples, str(path))
    return _validate(_load_json(Path(path), log), log, warnings)


def validate_coco(raw: Any, source: str, *, max_examples: int = 5, warnings: bool = True) -> CocoFile:
    """Validate an already parsed document (e.g. a ``pycocotools`` ``COCO().dataset``) by the same rules."""
    log = ProblemLog(SCHEMA_PROBLEMS, max_examples, source)
    if not isinstance(raw, dict):
        log.add("bad_structure", "", f"expected a JSON object, got {type(raw).__name__}")
        raw = None
    return _validate(raw, log, warnings)


def _load_json(path: Path, log: ProblemLog) -> dict[str, Any] | None:
    def unreadable(detail: str) -> None:
        log.add("unreadable_annotation_file", "", detail, example=f"{path}: {detail}")

    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            unreadable(f"{size} bytes, above the {MAX_FILE_BYTES}-byte limit for an annotation file")
            return None
        text = path.read_bytes()
    except FileNotFoundError as exc:
        unreadable(f"annotation file not found ({exc.strerror})")
        return None
    except OSError as exc:
        unreadable(f"cannot read annotation file: {exc.strerror or exc}")
        return None
    try:
        with gc_paused():
            raw = json.loads(text)  # from bytes: UTF-8 with or without a BOM (and UTF-16/32, detected)
    except RecursionError:
        unreadable("JSON nested deeper than the parser allows (about 1000 levels)")
        return None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        unreadable(f"not valid JSON: {exc}")
        return None
    if not isinstance(raw, dict):
        log.add("bad_structure", "", f"expected a JSON object, got {type(raw).__name__}")
        return None
    return raw


def _top_list(raw: dict[str, Any] | None, key: str, log: ProblemLog) -> list[Any] | None:
    if raw is None:
        return None
    if key not in raw:
        if key == "annotations":
            log.add("no_annotations_key", "", "no 'annotations'")
        else:
            log.add("bad_structure", "", f"missing top-level key {key!r}")
        return None
    if not isinstance(raw[key], list):
        log.add("bad_structure", "", f"{key!r} must be a list, got {type(raw[key]).__name__}")
        return None
    return raw[key]


def _validate(raw: dict[str, Any] | None, log: ProblemLog, warnings: bool) -> CocoFile:
    cats_raw = _top_list(raw, "categories", log)
    images_raw = _top_list(raw, "images", log)
    anns_raw = _top_list(raw, "annotations", log)
    categories = _categories(cats_raw, log)
    images = _images(images_raw or [], log, warnings)
    table = _annotations(
        anns_raw or [],
        images,
        categories,
        log,
        images_known=images_raw is not None,
        cats_known=cats_raw is not None,
    )
    if anns_raw is not None and warnings:
        annotation_warnings(table, anns_raw, images, categories, log)
    return CocoFile(
        source=log.source,
        images=images,
        categories=categories,
        annotations=table,
        num_annotation_entries=len(anns_raw or []),
        has_annotations=anns_raw is not None,
        problems=log.problems(),
        first_error=log.first_fatal,
    )


def _categories(cats_raw: list[Any] | None, log: ProblemLog) -> dict[int, str]:
    categories: dict[int, str] = {}
    index_of_name: dict[str, int] = {}
    for i, cat in enumerate(cats_raw or []):
        where = f"categories[{i}]"
        problem = field_problem(cat, "id", is_id, "an integer within the 64-bit range") or field_problem(
            cat, "name", lambda v: isinstance(v, str), "a string"
        )
        if problem is not None:
            log.add("malformed_category", where, problem, example=f"{where}: {short(cat)}")
            continue
        cat_id, name = cat["id"], cat["name"]
        if cat_id in categories:
            detail = f"duplicate category id {cat_id}"
            log.add("duplicate_category_id", where, detail, example=f"category id {cat_id} ({where})")
            continue
        if name in index_of_name:
            detail = f"duplicate category name {short(name)} (also categories[{index_of_name[name]}])"
            log.add(
                "duplicate_category_name",
                where,
                detail,
                example=f"category id {cat_id} {short(name)} ({where})",
            )
        index_of_name.setdefault(name, i)
        categories[cat_id] = name
    if cats_raw is not None and not categories:
        empty = "'categories' is empty; need at least one category"
        log.add("no_categories", "", empty if not cats_raw else "'categories' has no valid entry")
    return categories


def _images(images_raw: list[Any], log: ProblemLog, warnings: bool) -> dict[int, ImageRecord]:
    images: dict[int, ImageRecord] = {}
    for i, img in enumerate(images_raw):
        # Fast path for well-formed entries (COCO train2017 has 118k); the checks below name the problem.
        if type(img) is dict:
            image_id, file_name = img.get("id"), img.get("file_name")
            height, width = img.get("height"), img.get("width")
            if (
                type(image_id) is int
                and -(2**63) <= image_id < 2**63
                and type(file_name) is str
                and file_name
                and type(height) is int
                and type(width) is int
                and 0 < height < _MAX_SIDE
                and 0 < width < _MAX_SIDE
                and image_id not in images
            ):
                images[image_id] = ImageRecord(image_id, file_name, height, width)
                continue
        where = (
            f"images[{i}] (id {img['id']})"
            if isinstance(img, dict) and is_id(img.get("id"))
            else f"images[{i}]"
        )
        problem = _image_problem(img)
        if problem is not None:
            log.add("malformed_image", where, problem)
        else:
            detail = f"duplicate image id {img['id']}"
            log.add("duplicate_image_id", where, detail, example=f"image id {img['id']} (images[{i}])")
    if warnings:
        file_name_warnings(images, log)
    return images


def _image_problem(img: Any) -> str | None:
    side = "a positive integer below 2**31"
    for key, check, expected in (
        ("id", is_id, "an integer within the 64-bit range"),
        ("file_name", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        ("height", lambda v: is_int(v) and 0 < v < _MAX_SIDE, side),
        ("width", lambda v: is_int(v) and 0 < v < _MAX_SIDE, side),
    ):
        problem = field_problem(img, key, check, expected)
        if problem is not None:
            return problem
    return None


def _annotations(
    anns: list[Any],
    images: dict[int, ImageRecord],
    categories: dict[int, str],
    log: ProblemLog,
    *,
    images_known: bool,
    cats_known: bool,
) -> AnnotationTable:
    """The valid annotations as columns: a vectorised check first, a per-entry walk only when it fails."""
    columns = _columns_if_all_valid(anns, images, categories)
    if columns is None:
        rows = [
            _annotation_row(i, ann, images, categories, log, images_known, cats_known)
            for i, ann in enumerate(anns)
        ]
        columns = _columns_from_rows([r for r in rows if r is not None])
    index, image_ids, cat_ids, boxes_xywh, crowd, areas = columns
    boxes_xyxy, status = box_status(boxes_xywh, crowd, image_ids, images)
    return AnnotationTable(index, image_ids, cat_ids, boxes_xywh, boxes_xyxy, crowd, areas, status)


_Row = tuple[int, int, int, list[float], bool, float]
_Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _columns_if_all_valid(
    anns: list[Any], images: dict[int, ImageRecord], categories: dict[int, str]
) -> _Columns | None:
    """The columns when every annotation is valid, else None (then :func:`_annotation_row` names why).

    One pass pulls the fields out of every entry and the checks are vectorised: COCO train2017's 860k
    annotations validate in about a second, a per-entry walk would take several.
    """
    n = len(anns)
    if n == 0:
        return _columns_from_rows([])
    try:
        image_vals = [a["image_id"] for a in anns]
        cat_vals = [a["category_id"] for a in anns]
        bbox_vals = [a["bbox"] for a in anns]
        crowd_vals = [a.get("iscrowd", 0) for a in anns]
        area_vals = [a.get("area") for a in anns]
        # a JSON true/false is a bool, which numpy would silently read as 1/0
        if set(map(type, image_vals + cat_vals + crowd_vals)) != {int}:
            return None
        if not {type(v) for box in bbox_vals for v in box} <= {int, float}:
            return None
        if not set(map(type, area_vals)) <= {int, float, type(None)}:
            return None
        image_col = np.array(image_vals, dtype=np.int64)
        cat_col = np.array(cat_vals, dtype=np.int64)
        crowd_col = np.array(crowd_vals, dtype=np.int64)
        bbox_col = np.array(bbox_vals, dtype=np.float64)
        area_col = np.array([np.nan if a is None else a for a in area_vals], dtype=np.float64)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        return None
    has_area = np.array([a is not None for a in area_vals], dtype=bool)
    ok = (
        bbox_col.shape == (n, 4)
        and bool(np.isfinite(bbox_col).all())
        and bool(np.isfinite(area_col[has_area]).all())
        and bool(np.isin(crowd_col, (0, 1)).all())
        and bool(np.isin(image_col, np.fromiter(images, np.int64, len(images))).all())
        and bool(np.isin(cat_col, np.fromiter(categories, np.int64, len(categories))).all())
    )
    if not ok:
        return None
    return np.arange(n, dtype=np.int64), image_col, cat_col, bbox_col, crowd_col == 1, area_col


def _columns_from_rows(rows: list[_Row]) -> _Columns:
    k = len(rows)
    return (
        np.array([r[0] for r in rows], dtype=np.int64).reshape(k),
        np.array([r[1] for r in rows], dtype=np.int64).reshape(k),
        np.array([r[2] for r in rows], dtype=np.int64).reshape(k),
        np.array([r[3] for r in rows], dtype=np.float64).reshape(k, 4),
        np.array([r[4] for r in rows], dtype=bool).reshape(k),
        np.array([r[5] for r in rows], dtype=np.float64).reshape(k),
    )


def _is_crowd_flag(value: Any) -> bool:
    return is_int(value) and value in (0, 1)


def _is_bbox(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) == 4 and all(is_int(v) or isinstance(v, float) for v in value)
    )


def _annotation_row(
    i: int,
    ann: Any,
    images: dict[int, ImageRecord],
    categories: dict[int, str],
    log: ProblemLog,
    images_known: bool,
    cats_known: bool,
) -> _Row | None:
    """``annotations[i]`` as a row, or None after logging its fatal problem.

    Field types first (all of them), then the references, then finiteness. A reference to a missing
    'images' or 'categories' section is not reported again for every annotation.
    """
    where = f"annotations[{i}]"
    if not isinstance(ann, dict):
        log.add("malformed_annotation", where, f"expected an object, got {type(ann).__name__}")
        return None
    name = f"annotation id {ann['id']}" if is_int(ann.get("id")) else where
    if "id" in ann:
        where = f"annotations[{i}] (id {short(ann['id'])})"
    bad = [
        p
        for p in (
            field_problem(ann, "image_id", is_int, "an integer"),
            field_problem(ann, "category_id", is_int, "an integer"),
            field_problem(ann, "bbox", _is_bbox, "a list of 4 numbers [x, y, w, h]"),
            None if "iscrowd" not in ann else field_problem(ann, "iscrowd", _is_crowd_flag, "0 or 1"),
            None if ann.get("area") is None else field_problem(ann, "area", finite, "a finite number"),
        )
        if p is not None
    ]
    if bad:
        log.add("malformed_annotation", where, "; ".join(bad), example=f"{name}: {'; '.join(bad)}")
        return None
    image_id, cat_id, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
    if image_id not in images:
        if images_known:
            detail = f"image_id {image_id} is not in 'images'"
            log.add("unknown_image_id", where, detail, example=f"{name}: image_id {short(image_id)}")
        return None
    if cat_id not in categories:
        if cats_known:
            detail = f"unknown category_id {cat_id} (not in 'categories')"
            log.add("unknown_category_id", where, detail, example=f"{name} (image {image_id}): {detail}")
        return None
    if not all(finite(v) for v in bbox):
        detail = f"bbox {short(bbox)} holds a non-finite value"
        log.add("nonfinite_box", where, detail, example=f"{name} (image {image_id}): {detail}")
        return None
    area = ann.get("area")
    crowd = ann.get("iscrowd") == 1
    return i, image_id, cat_id, [float(v) for v in bbox], crowd, np.nan if area is None else float(area)

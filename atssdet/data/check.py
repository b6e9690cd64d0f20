"""Dataset health check of a COCO-format split: ``python -m atssdet data check ANN_JSON --images DIR``.

Unlike :class:`atssdet.data.coco.COCODetection`, which stops at the first malformed entry, the check
is lenient: it walks the whole file, records every problem it finds with a count and the first
offending ids, and keeps going. Each problem kind has a fixed severity:

* ``fatal``: the reader would refuse the file or an image (wrong structure, malformed entries,
  duplicate image/category ids, unknown image/category ids, non-finite boxes, missing or unreadable
  images, a decoded size that differs from the JSON), or nothing would be left to train on;
* ``warning``: the data loads but something is probably wrong (boxes that are dropped as
  degenerate or entirely outside their image, boxes that extend beyond it, crowd-only and empty
  images that training skips, duplicate annotation ids that break pycocotools evaluation, unused
  categories, duplicate file names, missing annotation ids).

:func:`check_dataset` returns a :class:`CheckReport`; ``report.fatal`` lists the fatal problems and
``report.raise_if_fatal()`` raises a :class:`DatasetCheckError` carrying the formatted report (what
``train`` calls at start-up).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2

from atssdet.data.coco import DatasetError
from atssdet.data.image_io import ImageReadError, read_image
from atssdet.fileio import atomic_write_json

Severity = Literal["fatal", "warning"]

# code -> (severity, description). The order here is the order of the report.
PROBLEM_KINDS: dict[str, tuple[Severity, str]] = {
    "unreadable_annotation_file": ("fatal", "annotation file missing, unreadable or not valid JSON"),
    "bad_structure": ("fatal", "top-level structure is wrong (not an object, key missing or not a list)"),
    "image_folder_missing": ("fatal", "image folder not found"),
    "malformed_category": ("fatal", "category entry malformed (needs integer 'id' and string 'name')"),
    "duplicate_category_id": ("fatal", "duplicate category id"),
    "no_categories": ("fatal", "no categories"),
    "malformed_image": (
        "fatal",
        "image entry malformed (needs integer 'id', 'file_name', positive 'height'/'width')",
    ),
    "duplicate_image_id": ("fatal", "duplicate image id"),
    "malformed_annotation": (
        "fatal",
        "annotation entry malformed (needs 'image_id', 'category_id', 'bbox' [x, y, w, h], 'iscrowd' 0/1)",
    ),
    "nonfinite_box": ("fatal", "box holds NaN or inf"),
    "unknown_image_id": ("fatal", "annotation refers to an image id not in 'images'"),
    "unknown_category_id": ("fatal", "annotation refers to a category id not in 'categories'"),
    "missing_file": ("fatal", "image file not found"),
    "unreadable_image": ("fatal", "image file cannot be decoded"),
    "size_mismatch": ("fatal", "decoded image size differs from the JSON height/width"),
    "no_trainable_images": ("fatal", "no image has a valid non-crowd box: nothing to train on"),
    "degenerate_box": ("warning", "box with zero or negative width/height (ignored by training)"),
    "box_outside_image": ("warning", "box entirely outside its image (ignored by training)"),
    "box_partly_outside": ("warning", "box extends beyond its image border (kept unclipped)"),
    "crowd_only_image": ("warning", "image whose only boxes are crowd boxes (skipped by training)"),
    "empty_image": ("warning", "image without any annotation (skipped by training)"),
    "no_valid_box_image": (
        "warning",
        "image whose annotations are all degenerate or outside (skipped by training)",
    ),
    "duplicate_annotation_id": ("warning", "duplicate annotation id (pycocotools evaluation keeps only one)"),
    "missing_annotation_id": (
        "warning",
        "annotation without an integer 'id' (pycocotools evaluation needs one)",
    ),
    "duplicate_file_name": ("warning", "several image entries share a file name"),
    "file_outside_image_dir": ("warning", "file_name is absolute or climbs out of the image folder ('..')"),
    "unused_category": ("warning", "category without any valid box"),
    "no_annotations_key": ("warning", "no 'annotations' key (an unlabelled split, e.g. test-dev)"),
}


@dataclass
class Problem:
    """One kind of problem: how many entries have it and the first few (``examples``, id first)."""

    code: str
    severity: Severity
    description: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """What :func:`check_dataset` found. ``problems`` holds only kinds that occurred."""

    ann_file: str
    image_dir: str | None
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    images_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    # category id -> (name, valid non-crowd boxes); in category id order.
    class_counts: dict[int, tuple[str, int]] = field(default_factory=dict)

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "fatal"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no fatal problem (warnings allowed)."""
        return not self.fatal

    def problem(self, code: str) -> Problem | None:
        return next((p for p in self.problems if p.code == code), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ann_file": self.ann_file,
            "image_dir": self.image_dir,
            "num_images": self.num_images,
            "num_annotations": self.num_annotations,
            "num_categories": self.num_categories,
            "images_read": self.images_read,
            "ok": self.ok,
            "num_fatal": len(self.fatal),
            "num_warnings": len(self.warnings),
            "problems": [asdict(p) for p in self.problems],
            "class_counts": [
                {"category_id": k, "name": name, "boxes": n} for k, (name, n) in self.class_counts.items()
            ],
        }

    def format(self, *, max_examples: int = 5) -> str:
        """The human-readable report (what ``atssdet data check`` prints)."""
        where = f"images in {self.image_dir}" if self.image_dir is not None else "no image folder given"
        lines = [f"{self.ann_file} ({where})"]
        lines.append(
            f"  {self.num_images} images, {self.num_annotations} annotations, {self.num_categories} "
            f"categories; {self.images_read} images read"
        )
        for p in self.problems:
            shown = "; ".join(p.examples[:max_examples])
            more = ", ..." if p.count > min(len(p.examples), max_examples) else ""
            lines.append(f"{p.severity.upper():7} {p.code} x{p.count}: {p.description}")
            if shown:
                lines.append(f"          first: {shown}{more}")
        if self.class_counts:
            parts = ", ".join(f"{name} {n}" for name, n in self.class_counts.values())
            lines.append(f"class balance (valid boxes): {parts}")
            (big_name, big), (small_name, small) = (
                max(self.class_counts.values(), key=lambda c: c[1]),
                min(self.class_counts.values(), key=lambda c: c[1]),
            )
            ratio = f" = {big / small:.1f}x" if small > 0 else ""
            lines.append(f"  largest/smallest class: {big_name} {big} / {small_name} {small}{ratio}")
        nf, nw = len(self.fatal), len(self.warnings)
        verdict = "FAILED" if nf else "OK"
        lines.append(f"{verdict}: {nf} fatal problem kind(s), {nw} warning kind(s)")
        return "\n".join(lines)

    def raise_if_fatal(self) -> None:
        """Raise :class:`DatasetCheckError` (with the formatted report) if there is a fatal problem."""
        if self.fatal:
            raise DatasetCheckError(self)


class DatasetCheckError(DatasetError):
    """A dataset with fatal problems; ``.report`` is the :class:`CheckReport`, the message its text."""

    def __init__(self, report: CheckReport) -> None:
        super().__init__(f"{report.ann_file}: dataset check failed\n{report.format()}")
        self.report = report


class _Collector:
    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.problems: dict[str, Problem] = {}

    def add(self, code: str, example: str) -> None:
        p = self.problems.get(code)
        if p is None:
            severity, description = PROBLEM_KINDS[code]
            p = self.problems[code] = Problem(code, severity, description)
        p.count += 1
        if len(p.examples) < self.max_examples:
            p.examples.append(example)

    def ordered(self) -> list[Problem]:
        return [self.problems[c] for c in PROBLEM_KINDS if c in self.problems]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows any length)
        return False


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class _Image:
    image_id: int
    file_name: str
    height: int
    width: int


def check_dataset(
    ann_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str] | None,
    *,
    read_images: bool = True,
    num_workers: int | None = None,
    progress: bool = False,
    max_examples: int = 5,
) -> CheckReport:
    """Check a COCO-format split and return a :class:`CheckReport` (never raises on bad data).

    Args:
        ann_file: COCO ``instances`` JSON.
        image_dir: folder that ``file_name`` is relative to; None skips every file check.
        read_images: decode every image (thread pool) to find unreadable files and size mismatches;
            False only checks that the files exist.
        num_workers: image reading threads (default ``min(8, os.cpu_count())``).
        progress: show a tqdm progress bar while reading images.
        max_examples: how many offending entries to keep per problem kind.
    """
    src = str(ann_file)
    report = CheckReport(ann_file=src, image_dir=None if image_dir is None else str(image_dir))
    out = _Collector(max_examples)
    raw = _load(Path(ann_file), out)
    if raw is not None:
        _check_content(raw, report, out, image_dir, read_images, num_workers, progress)
    report.problems = out.ordered()
    return report


def _load(path: Path, out: _Collector) -> dict[str, Any] | None:
    try:
        text = path.read_bytes()
    except OSError as exc:
        out.add("unreadable_annotation_file", f"{path}: {exc.strerror or exc}")
        return None
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        out.add("unreadable_annotation_file", f"{path}: not valid JSON: {exc}")
        return None
    if not isinstance(raw, dict):
        out.add("bad_structure", f"expected a JSON object, got {type(raw).__name__}")
        return None
    return raw


def _top_list(raw: dict[str, Any], key: str, out: _Collector) -> list[Any] | None:
    if key not in raw:
        if key == "annotations":
            out.add("no_annotations_key", "no 'annotations'")
        else:
            out.add("bad_structure", f"missing top-level key {key!r}")
        return None
    value = raw[key]
    if not isinstance(value, list):
        out.add("bad_structure", f"{key!r} must be a list, got {type(value).__name__}")
        return None
    return value


def _check_content(
    raw: dict[str, Any],
    report: CheckReport,
    out: _Collector,
    image_dir: str | os.PathLike[str] | None,
    read_images: bool,
    num_workers: int | None,
    progress: bool,
) -> None:
    cats_raw = _top_list(raw, "categories", out)
    images_raw = _top_list(raw, "images", out)
    anns_raw = _top_list(raw, "annotations", out)

    categories: dict[int, str] = {}
    for i, cat in enumerate(cats_raw or []):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            out.add("malformed_category", f"categories[{i}]: {_short(cat)}")
            continue
        if cat["id"] in categories:
            out.add("duplicate_category_id", f"category id {cat['id']} (categories[{i}])")
            continue
        categories[cat["id"]] = cat["name"]
    if cats_raw is not None and not categories:
        out.add("no_categories", "'categories' has no valid entry")
    report.num_categories = len(categories)

    images: dict[int, _Image] = {}
    file_names: Counter[str] = Counter()
    for i, img in enumerate(images_raw or []):
        problem = _image_entry_problem(img)
        if problem is not None:
            out.add("malformed_image", f"images[{i}]: {problem}")
            continue
        entry = _Image(img["id"], img["file_name"], img["height"], img["width"])
        if entry.image_id in images:
            out.add("duplicate_image_id", f"image id {entry.image_id} (images[{i}])")
            continue
        images[entry.image_id] = entry
        file_names[entry.file_name] += 1
        name_path = Path(entry.file_name)
        if name_path.is_absolute() or ".." in name_path.parts:
            out.add("file_outside_image_dir", f"image id {entry.image_id}: {entry.file_name!r}")
    for name, n in file_names.items():
        if n > 1:
            out.add("duplicate_file_name", f"{name!r} x{n}")
    report.num_images = len(images)

    valid_boxes: Counter[int] = Counter()  # image id -> valid non-crowd boxes
    any_boxes: Counter[int] = Counter()  # image id -> annotations of any kind
    per_category: Counter[int] = Counter()
    crowd_images: set[int] = set()
    ann_ids: set[int] = set()
    for i, ann in enumerate(anns_raw or []):
        _check_annotation(
            i,
            ann,
            images,
            categories,
            out,
            ann_ids,
            valid_boxes,
            any_boxes,
            per_category,
            crowd_images,
            unknown_images_possible=images_raw is not None,
        )
    report.num_annotations = len(anns_raw or [])

    if anns_raw is not None:
        for image_id, entry in images.items():
            if any_boxes[image_id] == 0:
                out.add("empty_image", f"image id {image_id} {entry.file_name!r}")
            elif valid_boxes[image_id] == 0 and image_id in crowd_images:
                out.add("crowd_only_image", f"image id {image_id} {entry.file_name!r}")
            elif valid_boxes[image_id] == 0:
                out.add("no_valid_box_image", f"image id {image_id} {entry.file_name!r}")
        if images and not any(valid_boxes[k] for k in images):
            out.add("no_trainable_images", f"{len(images)} images, none with a valid non-crowd box")
        for cat_id, name in sorted(categories.items()):
            if per_category[cat_id] == 0:
                out.add("unused_category", f"category id {cat_id} {name!r}")
    report.class_counts = {k: (categories[k], per_category[k]) for k in sorted(categories)}

    if image_dir is None:
        return
    root = Path(image_dir)
    if not root.is_dir():
        out.add("image_folder_missing", str(root))
        return
    report.images_read = _check_files(root, images, out, read_images, num_workers, progress)


def _image_entry_problem(img: Any) -> str | None:
    if not isinstance(img, dict):
        return f"expected an object, got {type(img).__name__}"
    for key, check, expected in (
        ("id", _is_int, "an integer"),
        ("file_name", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        ("height", lambda v: _is_int(v) and 0 < v < 2**31, "a positive integer below 2**31"),
        ("width", lambda v: _is_int(v) and 0 < v < 2**31, "a positive integer below 2**31"),
    ):
        if key not in img:
            where = f" (id {img['id']})" if _is_int(img.get("id")) else ""
            return f"missing key {key!r}{where}"
        if not check(img[key]):
            return f"{key!r} must be {expected}, got {_short(img[key])}"
    return None


def _check_annotation(
    i: int,
    ann: Any,
    images: dict[int, _Image],
    categories: dict[int, str],
    out: _Collector,
    ann_ids: set[int],
    valid_boxes: Counter[int],
    any_boxes: Counter[int],
    per_category: Counter[int],
    crowd_images: set[int],
    *,
    unknown_images_possible: bool,
) -> None:
    """Check one annotation; valid non-crowd boxes are counted per image and per category."""
    if not isinstance(ann, dict):
        out.add("malformed_annotation", f"annotations[{i}]: expected an object, got {type(ann).__name__}")
        return
    ann_id = ann.get("id")
    name = f"annotation id {ann_id}" if _is_int(ann_id) else f"annotations[{i}]"
    if ann_id is None or not _is_int(ann_id):
        out.add("missing_annotation_id", f"annotations[{i}]: id {_short(ann_id)}")
    elif ann_id in ann_ids:
        out.add("duplicate_annotation_id", f"annotation id {ann_id} (annotations[{i}])")
    else:
        ann_ids.add(ann_id)

    image_id, cat_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
    iscrowd = ann.get("iscrowd", 0)
    bad = [
        f"{key} {_short(ann.get(key)) if key in ann else 'missing'}"
        for key, ok in (
            ("image_id", _is_int(image_id)),
            ("category_id", _is_int(cat_id)),
            ("bbox", isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)),
            ("iscrowd", _is_int(iscrowd) and iscrowd in (0, 1)),
        )
        if not ok
    ]
    if bad:
        out.add("malformed_annotation", f"{name}: {', '.join(bad)}")
        return
    image_id, cat_id, bbox = int(ann["image_id"]), int(ann["category_id"]), list(ann["bbox"])
    where = f"{name} (image {image_id})"
    entry = images.get(image_id)
    if entry is None:
        if unknown_images_possible:
            out.add("unknown_image_id", f"{name}: image_id {image_id}")
        return
    any_boxes[image_id] += 1
    if cat_id not in categories:
        out.add("unknown_category_id", f"{where}: category_id {cat_id}")
        return
    if not all(_finite(v) for v in bbox):
        out.add("nonfinite_box", f"{where}: bbox {bbox}")
        return
    x, y, w, h = (float(v) for v in bbox)
    if iscrowd == 1:
        crowd_images.add(image_id)
        return
    if w <= 0 or h <= 0:
        out.add("degenerate_box", f"{where}: bbox {bbox}")
        return
    if x + w <= 0 or y + h <= 0 or x >= entry.width or y >= entry.height:
        out.add("box_outside_image", f"{where}: bbox {bbox} vs image {entry.width}x{entry.height} (WxH)")
        return
    if x < 0 or y < 0 or x + w > entry.width or y + h > entry.height:
        out.add("box_partly_outside", f"{where}: bbox {bbox} vs image {entry.width}x{entry.height} (WxH)")
    valid_boxes[image_id] += 1
    per_category[cat_id] += 1


def _check_files(
    root: Path,
    images: dict[int, _Image],
    out: _Collector,
    read_images: bool,
    num_workers: int | None,
    progress: bool,
) -> int:
    """Existence (and with ``read_images`` decoding and size) of every image file; returns images read."""
    entries = sorted(images.values(), key=lambda e: e.image_id)
    task: Callable[[Path, _Image], tuple[str, str] | None] = _read_one if read_images else _stat_one
    workers = num_workers or min(8, os.cpu_count() or 1)

    results: list[tuple[str, str] | None] = []
    # OpenCV logs its own decoder complaints to stderr; the report already names each bad file.
    log_level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        _map_with_progress(task, root, entries, workers, progress, results)
    finally:
        cv2.utils.logging.setLogLevel(log_level)
    read = 0
    for result in results:
        if result is None:
            read += 1
        else:
            out.add(*result)
            read += result[0] == "size_mismatch"
    return read if read_images else 0


def _map_with_progress(
    task: Callable[[Path, _Image], tuple[str, str] | None],
    root: Path,
    entries: list[_Image],
    workers: int,
    progress: bool,
    results: list[tuple[str, str] | None],
) -> None:
    from tqdm import tqdm

    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(entries), desc="checking images", unit="img", disable=not progress) as bar,
    ):
        for result in pool.map(lambda e: task(root, e), entries):
            results.append(result)
            bar.update(1)


def _stat_one(root: Path, entry: _Image) -> tuple[str, str] | None:
    path = root / entry.file_name
    if not path.is_file():
        return "missing_file", f"image id {entry.image_id}: {path}"
    return None


def _read_one(root: Path, entry: _Image) -> tuple[str, str] | None:
    path = root / entry.file_name
    if not path.is_file():
        return "missing_file", f"image id {entry.image_id}: {path}"
    try:
        image = read_image(path)
    except ImageReadError as exc:
        return "unreadable_image", f"image id {entry.image_id}: {exc}"
    if image.shape[:2] != (entry.height, entry.width):
        return (
            "size_mismatch",
            f"image id {entry.image_id}: {path} is {image.shape[0]}x{image.shape[1]} (HxW), "
            f"JSON says {entry.height}x{entry.width}",
        )
    return None


def write_report_json(report: CheckReport, path: str | os.PathLike[str]) -> Path:
    """Write ``report.to_dict()`` atomically (temp file in the same folder, then rename)."""
    return atomic_write_json(path, report.to_dict(), indent=1)

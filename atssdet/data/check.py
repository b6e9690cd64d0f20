"""Dataset health check of a split: ``python -m atssdet data check ANN_JSON --images DIR`` (or a YOLO,
VOC or CVAT dataset: ``data check DATA``, read by :mod:`atssdet.data.formats`).

The JSON is validated by :mod:`atssdet.data.coco_schema`, the same rules the reader
(:class:`atssdet.data.coco.COCODetection`) and ``eval`` apply, so the three give one verdict on every
file. Where they stop at the first fatal problem, the check lists every problem with a count and the
first offending ids, and adds what only a check of the split can see. Each problem kind has a fixed
severity (:data:`PROBLEM_KINDS`):

* ``fatal``: the schema refuses the file (wrong structure, malformed entries, duplicate ids or
  category names, unknown image/category ids, non-finite boxes), an image file is missing,
  unreadable or of another size than the JSON says, or nothing would be left to train on;
* ``warning``: the data loads but something is probably wrong (boxes that are dropped as
  degenerate or entirely outside their image, boxes that extend beyond it, crowd-only and empty
  images that training skips, duplicate or missing annotation ids, unused categories, duplicate
  file names).

:func:`check_dataset` returns a :class:`CheckReport`; ``report.fatal`` lists the fatal problems and
``report.raise_if_fatal()`` raises a :class:`DatasetCheckError` carrying the formatted report (what
``train`` calls at start-up).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from atssdet.data.coco_records import CocoFile, DatasetError, ImageRecord, Problem, ProblemLog, Severity
from atssdet.data.coco_schema import SCHEMA_PROBLEMS, read_coco_file
from atssdet.data.formats.common import FORMAT_PROBLEMS, ForeignDataset
from atssdet.data.image_io import ImageReadError, read_image
from atssdet.fileio import atomic_write_json
from atssdet.guard import OutputGuard

# Problems of the files and of the split as a whole; the schema's are about the JSON alone.
_SPLIT_PROBLEMS: dict[str, tuple[Severity, str]] = {
    "image_folder_missing": ("fatal", "image folder not found"),
    "missing_file": ("fatal", "image file not found"),
    "unreadable_image": ("fatal", "image file cannot be decoded"),
    "size_mismatch": ("fatal", "decoded image size differs from the JSON height/width"),
    "no_trainable_images": ("fatal", "no image has a valid non-crowd box: nothing to train on"),
}

# code -> (severity, description). The order here is the order of the report: fatal first.
# The format readers' problems (YOLO, VOC, CVAT: file and line named) come with the schema's.
PROBLEM_KINDS: dict[str, tuple[Severity, str]] = {
    **{k: v for k, v in FORMAT_PROBLEMS.items() if v[0] == "fatal"},
    **{k: v for k, v in SCHEMA_PROBLEMS.items() if v[0] == "fatal"},
    **_SPLIT_PROBLEMS,
    **{k: v for k, v in FORMAT_PROBLEMS.items() if v[0] == "warning"},
    **{k: v for k, v in SCHEMA_PROBLEMS.items() if v[0] == "warning"},
}


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


def check_dataset(
    ann_file: str | os.PathLike[str] | ForeignDataset,
    image_dir: str | os.PathLike[str] | None,
    *,
    read_images: bool = True,
    num_workers: int | None = None,
    progress: bool = False,
    max_examples: int = 5,
) -> CheckReport:
    """Check a COCO-format split and return a :class:`CheckReport` (never raises on bad data).

    Args:
        ann_file: COCO ``instances`` JSON, or a YOLO / VOC / CVAT split read by
            :func:`atssdet.data.formats.read_split` (its problems name the file and line or element).
        image_dir: folder that ``file_name`` is relative to; None skips every file check (for a
            YOLO / VOC / CVAT split: its own image folder).
        read_images: decode every image (thread pool) to find unreadable files and size mismatches;
            False only checks that the files exist.
        num_workers: image reading threads (default ``min(8, os.cpu_count())``).
        progress: show a tqdm progress bar while reading images.
        max_examples: how many offending entries to keep per problem kind.
    """
    if isinstance(ann_file, ForeignDataset):
        coco = ann_file.coco(max_examples=max_examples)
        image_dir = ann_file.image_root if image_dir is None else image_dir
    else:
        coco = read_coco_file(ann_file, max_examples=max_examples)
    report = CheckReport(
        ann_file=str(ann_file),
        image_dir=None if image_dir is None else str(image_dir),
        num_images=len(coco.images),
        num_annotations=coco.num_annotation_entries,
        num_categories=len(coco.categories),
    )
    report.class_counts = _class_counts(coco)
    log = ProblemLog(_SPLIT_PROBLEMS, max_examples, str(ann_file))
    if coco.has_annotations and coco.images and not coco.annotations.trainable.any():
        log.add("no_trainable_images", "", f"{len(coco.images)} images, none with a valid non-crowd box")
    if image_dir is not None:
        root = Path(image_dir)
        if not root.is_dir():
            log.add("image_folder_missing", "", str(root))
        else:
            report.images_read = _check_files(
                root, coco.sorted_images(), log, read_images, num_workers, progress
            )
    order = list(PROBLEM_KINDS)
    report.problems = sorted(coco.problems + log.problems(), key=lambda p: order.index(p.code))
    return report


def _class_counts(coco: CocoFile) -> dict[int, tuple[str, int]]:
    """category id -> (name, training boxes), in category id order."""
    table = coco.annotations
    cat_ids = sorted(coco.categories)
    labels = np.searchsorted(np.array(cat_ids, dtype=np.int64), table.category_ids[table.trainable])
    counts = np.bincount(labels, minlength=len(cat_ids)).tolist()
    return {k: (coco.categories[k], int(n)) for k, n in zip(cat_ids, counts, strict=True)}


def _check_files(
    root: Path,
    entries: list[ImageRecord],
    log: ProblemLog,
    read_images: bool,
    num_workers: int | None,
    progress: bool,
) -> int:
    """Existence (and with ``read_images`` decoding and size) of every image file; returns images read."""
    task: Callable[[Path, ImageRecord], tuple[str, str] | None] = _read_one if read_images else _stat_one
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
            log.add(result[0], "", result[1])
            read += result[0] == "size_mismatch"
    return read if read_images else 0


def _map_with_progress(
    task: Callable[[Path, ImageRecord], tuple[str, str] | None],
    root: Path,
    entries: list[ImageRecord],
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


def _stat_one(root: Path, entry: ImageRecord) -> tuple[str, str] | None:
    path = root / entry.file_name
    if not path.is_file():
        return "missing_file", f"image id {entry.image_id}: {path}"
    return None


def _read_one(root: Path, entry: ImageRecord) -> tuple[str, str] | None:
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


COMMAND = "data check"  # the written-by mark of its --json report


def report_guard(ann_file: str | os.PathLike[str], *, overwrite: bool = False) -> OutputGuard:
    """The output guard of ``data check`` (its input: the annotation file)."""
    return OutputGuard(COMMAND, inputs=[ann_file], overwrite=overwrite)


def write_report_json(report: CheckReport, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``report.to_dict()`` atomically (temp file in the same folder, then rename); refuses to
    replace the checked annotation file, or a file ``data check`` did not write unless ``overwrite``."""
    report_guard(report.ann_file, overwrite=overwrite).check([path])
    return atomic_write_json(path, report.to_dict(), indent=1, mark=COMMAND)

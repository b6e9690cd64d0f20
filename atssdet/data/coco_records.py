"""The plain records a validated COCO file is made of, and the problem log the validation writes.

:mod:`atssdet.data.coco_schema` fills them; the reader, ``data check`` and ``eval`` read them.
:func:`box_status` is the one rule deciding which boxes are training targets.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import math
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Severity = Literal["fatal", "warning"]


class DatasetError(ValueError):
    """A malformed or inconsistent dataset; the message names the file and the entry at fault."""


class BoxStatus(enum.IntEnum):
    """Why an annotation box is, or is not, a training target (ordered: >= PARTLY_OUTSIDE is a target)."""

    CROWD = 0
    DEGENERATE = 1  # w <= 0 or h <= 0, or empty once converted to float32 xyxy
    OUTSIDE = 2  # no overlap with [0, W] x [0, H]
    PARTLY_OUTSIDE = 3  # a target, kept unclipped
    INSIDE = 4


@dataclass(frozen=True)
class ImageRecord:
    """One image entry of an annotation file (the library's one image-record type)."""

    image_id: int
    file_name: str  # relative to the image folder
    height: int
    width: int


def box_status(
    boxes_xywh: np.ndarray, crowd: np.ndarray, image_ids: np.ndarray, images: dict[int, ImageRecord]
) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float32 [K, 4] xyxy, :class:`BoxStatus` int8 [K]) of JSON boxes float64 [K, 4] xywh.

    ``crowd`` bool [K]; ``image_ids`` int64 [K], each a key of ``images`` (whose sizes bound the boxes).
    """
    boxes = boxes_xywh.astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    keys = np.fromiter(images, np.int64, len(images))
    order = np.argsort(keys)
    hw = np.array([(r.height, r.width) for r in images.values()], dtype=np.float32).reshape(-1, 2)
    at = order[np.searchsorted(keys[order], image_ids)] if len(image_ids) else np.zeros(0, np.int64)
    height, width = hw[at, 0], hw[at, 1]
    x1, y1, x2, y2 = boxes.T
    degenerate = (boxes_xywh[:, 2] <= 0) | (boxes_xywh[:, 3] <= 0) | (x2 <= x1) | (y2 <= y1)
    overlaps = (np.minimum(x2, width) > np.maximum(x1, 0)) & (np.minimum(y2, height) > np.maximum(y1, 0))
    inside = (x1 >= 0) & (y1 >= 0) & (x2 <= width) & (y2 <= height)
    status = np.select(
        [crowd, degenerate, ~overlaps, ~inside],
        [BoxStatus.CROWD, BoxStatus.DEGENERATE, BoxStatus.OUTSIDE, BoxStatus.PARTLY_OUTSIDE],
        BoxStatus.INSIDE,
    ).astype(np.int8)
    return boxes, status


@dataclass
class Problem:
    """One kind of problem: how many entries have it and the first few (``examples``, id first)."""

    code: str
    severity: Severity
    description: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


class ProblemLog:
    """Problems by code, with counts and the first ``max_examples`` examples, and the first fatal error.

    ``kinds`` is a code -> (severity, description) table, e.g. :data:`atssdet.data.coco_schema.SCHEMA_PROBLEMS`.
    """

    def __init__(self, kinds: dict[str, tuple[Severity, str]], max_examples: int, source: str) -> None:
        self.kinds = kinds
        self.max_examples = max_examples
        self.source = source
        self.first_fatal: str | None = None  # "source: where: detail": what a strict reader raises
        self._problems: dict[str, Problem] = {}

    def add(self, code: str, where: str, detail: str, *, example: str | None = None, count: int = 1) -> None:
        """Record ``count`` entries with problem ``code``; ``where`` locates the entry (``images[3] (id 7)``).

        The error text is ``where: detail``; ``example`` (default: that text) is what reports list.
        """
        p = self._problems.get(code)
        if p is None:
            severity, description = self.kinds[code]
            p = self._problems[code] = Problem(code, severity, description)
        message = f"{where}: {detail}" if where else detail
        if p.severity == "fatal" and self.first_fatal is None:
            self.first_fatal = f"{self.source}: {message}"
        p.count += count
        if len(p.examples) < self.max_examples:
            p.examples.append(message if example is None else example)

    def problems(self) -> list[Problem]:
        return [self._problems[c] for c in self.kinds if c in self._problems]


@dataclass(frozen=True)
class AnnotationTable:
    """The K annotations that passed validation, as columns in JSON order."""

    entry_index: np.ndarray  # int64 [K] position in the JSON 'annotations' list
    image_ids: np.ndarray  # int64 [K]
    category_ids: np.ndarray  # int64 [K]
    boxes_xywh: np.ndarray  # float64 [K, 4] the JSON values
    boxes_xyxy: np.ndarray  # float32 [K, 4] x2 = x + w in float32 (MegEngine's conversion), not clipped
    iscrowd: np.ndarray  # bool [K]
    areas: np.ndarray  # float64 [K], NaN where the JSON gives no 'area'
    status: np.ndarray  # int8 [K] BoxStatus

    @property
    def trainable(self) -> np.ndarray:
        """bool [K]: training targets (non-crowd, non-degenerate, overlapping their image)."""
        return self.status >= BoxStatus.PARTLY_OUTSIDE


@dataclass(frozen=True)
class CocoFile:
    """A validated annotation file: its valid entries and every problem found (see :mod:`atssdet.data.coco_schema`)."""

    source: str
    images: dict[int, ImageRecord]  # image id -> record, JSON order
    categories: dict[int, str]  # category id -> name, JSON order
    annotations: AnnotationTable
    num_annotation_entries: int  # entries of the JSON 'annotations' list, valid or not
    has_annotations: bool  # the file has an 'annotations' list
    problems: list[Problem]  # SCHEMA_PROBLEMS order
    first_error: str | None  # the first fatal problem, naming the file and the entry

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "fatal"]

    def raise_if_fatal(self) -> CocoFile:
        """``self`` when nothing is fatal, else a :class:`DatasetError` naming the first fatal problem."""
        if self.first_error is not None:
            raise DatasetError(self.first_error)
        return self

    def sorted_images(self) -> list[ImageRecord]:
        """The images sorted by id (ids come from the JSON, never from file names)."""
        return [self.images[k] for k in sorted(self.images)]


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 3, 8, 4
_repr.maxstring = _repr.maxother = 60
_repr.maxlong = 40


def short(value: Any) -> str:
    """``repr(value)``, bounded in length and depth (a hostile file's value cannot flood a message)."""
    return _repr.repr(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_id(value: Any) -> bool:
    """An integer that fits int64 (ids are indexed as int64 arrays)."""
    return is_int(value) and -(2**63) <= value < 2**63


def finite(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows any length)
        return False


def field_problem(entry: Any, key: str, check: Callable[[Any], bool], expected: str) -> str | None:
    """What is wrong with ``entry[key]`` (not an object, key missing, value fails ``check``), or None."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    if key not in entry:
        return f"missing key {key!r}"
    if not check(entry[key]):
        return f"{key!r} must be {expected}, got {short(entry[key])}"
    return None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of small acyclic objects (a parsed
    annotation file): its collections would rescan everything alive, about half the parse time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

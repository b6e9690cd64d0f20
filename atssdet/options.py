"""Inference options: the one vocabulary of test-time knobs, validated once.

:class:`InferenceOptions` is what ``Detector.predict``, ``predict``/``eval``/``serve`` on the command
line, the HTTP server and the metadata of an exported ONNX file all mean by "score threshold",
"NMS threshold", ... . MegEngine's config spells the same knobs ``test_cls_threshold``, ``test_nms``
and ``test_max_boxes_per_image``; :meth:`InferenceOptions.from_config` is the one place that maps
those names. No torch import here, so the CLI can validate flags before loading anything heavy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atssdet import validate
from atssdet.errors import OptionError

if TYPE_CHECKING:
    from atssdet.config import ATSSConfig


SLICE_MERGES = ("nms", "nmm")  # how sliced detections are merged (see atssdet.slicing)


@dataclass(frozen=True)
class SliceOptions:
    """Sliced inference (:mod:`atssdet.slicing`): square tiles through the model, merged back.

    Attributes:
        size: tile side in original pixels (tiles larger than the image are refused per image).
        overlap: fraction of ``size`` that neighbouring tiles share, in ``[0, 1)``.
        full_image: also run the whole (resized) image and merge its detections with the tiles'.
        merge: ``"nms"`` (keep the best box, IoU) or ``"nmm"`` (SAHI's greedy non-maximum merging:
            boxes matching the best one by intersection over the smaller box are merged into their union).
        merge_threshold: the IoU (nms) or IoS (nmm) above which two boxes of a class are one object.
        batch_size: tiles per forward pass (None: 8).
    """

    size: int
    overlap: float = 0.2
    full_image: bool = False
    merge: str = "nms"
    merge_threshold: float = 0.5
    batch_size: int | None = None

    def __post_init__(self) -> None:
        validate.image_side("slice size", self.size)
        object.__setattr__(self, "overlap", validate.fraction("slice overlap", self.overlap))
        if self.overlap >= 1.0:
            raise OptionError(f"slice overlap must be in [0, 1) (tiles must advance), got {self.overlap!r}")
        if not isinstance(self.full_image, bool):
            raise OptionError(f"slice full_image must be True or False, got {self.full_image!r}")
        if self.merge not in SLICE_MERGES:
            raise OptionError(f"slice merge must be one of {', '.join(SLICE_MERGES)}, got {self.merge!r}")
        validate.fraction("slice merge_threshold", self.merge_threshold)
        if self.batch_size is not None:
            validate.count("slice batch_size", self.batch_size)


@dataclass(frozen=True)
class InferenceOptions:
    """Test-time post-processing of one request/job (MegEngine's defaults).

    Attributes:
        score_threshold: keep a candidate when its score is ``> score_threshold`` (strict, as MegEngine).
        nms_threshold: suppress a box when its IoU with a better box of the same class is ``> nms_threshold``.
        max_detections: at most this many detections per image (>= 1).
        class_agnostic: one NMS over all classes instead of one per class.
        classes: keep only these label ids (0..C-1); ``None`` keeps every class. Names are resolved
            to ids with :func:`parse_classes` against the model's class names.
        flip_tta: also run the horizontally flipped image and merge both before NMS.
        slicing: sliced inference (:class:`SliceOptions`; a dict of its fields is accepted); None: off.
    """

    score_threshold: float = 0.05
    nms_threshold: float = 0.6
    max_detections: int = 100
    class_agnostic: bool = False
    classes: tuple[int, ...] | None = None
    flip_tta: bool = False
    slicing: SliceOptions | None = None

    def __post_init__(self) -> None:
        if isinstance(self.slicing, dict):
            names = {f.name for f in dataclasses.fields(SliceOptions)}
            unknown = sorted(set(self.slicing) - names)
            if unknown or "size" not in self.slicing:
                raise OptionError(
                    f"slicing: unknown field(s) {', '.join(unknown)}"
                    if unknown
                    else "slicing: size is required"
                )
            object.__setattr__(self, "slicing", SliceOptions(**self.slicing))
        elif self.slicing is not None and not isinstance(self.slicing, SliceOptions):
            raise OptionError(
                f"slicing must be SliceOptions, a dict of its fields or None, got {self.slicing!r}"
            )
        for name in ("score_threshold", "nms_threshold"):
            object.__setattr__(self, name, validate.fraction(name, getattr(self, name)))
        validate.count("max_detections", self.max_detections)
        for name in ("class_agnostic", "flip_tta"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.classes is not None:
            ids = tuple(self.classes)
            bad = [c for c in ids if isinstance(c, bool) or not isinstance(c, int) or c < 0]
            if bad:
                raise OptionError(
                    f"classes must be label ids >= 0 (use parse_classes for names), got {bad[0]!r}"
                )
            object.__setattr__(self, "classes", ids)

    @classmethod
    def from_config(cls, cfg: ATSSConfig, **changes: Any) -> InferenceOptions:
        """The config's test-time defaults (MegEngine names ``test_*``), then ``changes`` (None = keep)."""
        base = cls(
            score_threshold=cfg.test_cls_threshold,
            nms_threshold=cfg.test_nms,
            max_detections=cfg.test_max_boxes_per_image,
        )
        return base.replace(**changes)

    def replace(self, **changes: Any) -> InferenceOptions:
        """A copy with ``changes`` applied (entries whose value is None are ignored), validated again."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise OptionError(
                f"unknown inference option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``classes`` as a list or None)."""
        out = dataclasses.asdict(self)
        out["classes"] = None if self.classes is None else list(self.classes)
        return out


def parse_classes(
    classes: str | Iterable[int | str] | None, class_names: Sequence[str]
) -> tuple[int, ...] | None:
    """Label ids for class ids and/or names: ``"0, person"`` or ``["dog", 3]`` -> sorted unique ids.

    A string is split at commas first. Each entry is a label id ``0..C-1`` (ASCII digits) or a name
    of ``class_names`` (exact, else case-insensitive); anything else raises :class:`OptionError`
    naming the entry. ``None``, a blank string or an empty list means every class (``None``).
    """
    if classes is None:
        return None
    items: Iterable[int | str] = classes.split(",") if isinstance(classes, str) else classes
    by_lower = {n.lower(): i for i, n in reversed(list(enumerate(class_names)))}
    ids: set[int] = set()
    for raw in items:
        if isinstance(raw, bool):
            raise OptionError(f"class {raw!r}: not a class id or name")
        if isinstance(raw, int):
            i = raw
        else:
            text = str(raw).strip()
            if not text:
                continue
            if text in class_names:
                i = list(class_names).index(text)
            elif text.lower() in by_lower:
                i = by_lower[text.lower()]
            elif text.isascii() and text.isdigit():
                i = int(text)
            else:
                shown = ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else "")
                raise OptionError(f"class {text!r}: unknown class name (known: {shown})")
        if not 0 <= i < len(class_names):
            raise OptionError(f"class id {i} out of range 0..{len(class_names) - 1}")
        ids.add(i)
    return tuple(sorted(ids)) if ids else None

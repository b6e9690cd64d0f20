"""COCO-format detection dataset (any file names; image ids from the JSON; contiguous labels 0..C-1).

Annotation rules follow ``megengine.data.dataset.COCO`` (MegEngine/MegEngine
``imperative/python/megengine/data/dataset/vision/coco.py``), which MegEngine/Models
``official/vision/detection/tools/train.py`` builds with ``remove_images_without_annotations=True``:

* images are ordered by image id (``sorted(imgs.keys())``);
* an annotation counts only if ``iscrowd == 0`` and its xywh ``bbox`` has ``w > 0 and h > 0``;
  boxes become xyxy as ``x2 = x + w``, ``y2 = y + h`` in float32 and are *not* clipped;
* with ``remove_images_without_annotations`` an image without such an annotation is dropped;
* category ids map to contiguous classes in sorted-id order (MegEngine 1..C; here 0..C-1, the
  library's label convention).

Two deliberate differences, both invisible on COCO itself: crowd and degenerate boxes are left out
of the targets in every mode (MegEngine keeps crowd boxes when it does not filter, but only
evaluation uses that mode and it reads the ground truth from the JSON), and a box that lies
entirely outside its image (zero area once clipped to ``[0, W] x [0, H]``) or has ``x2 <= x1`` in
float32 is treated as degenerate too, because it can never be assigned a point.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from torch.utils.data import Dataset

from atssdet.data.image_io import read_image


class DatasetError(ValueError):
    """A malformed or inconsistent dataset; the message names the file and the entry at fault."""


class DetectionTarget(TypedDict):
    """Per-image training target (numpy; :func:`atssdet.data.collate.collate_detection` makes tensors)."""

    boxes: np.ndarray  # float32 [M, 4] xyxy, pixels of the (transformed) image
    labels: np.ndarray  # int64 [M], 0..C-1
    image_id: int
    orig_hw: tuple[int, int]  # (H, W) of the image as stored on disk


@dataclass(frozen=True)
class ImageInfo:
    """One image entry of the annotation file."""

    image_id: int
    file_name: str
    height: int
    width: int


# transform(image uint8 [H, W, 3], boxes float32 [M, 4], rng) -> (image, boxes)
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

# A dataset key: an index, or (index, seed) as yielded by the grouped batch sampler so that the
# random augmentation of every sample is reproducible whatever the number of DataLoader workers.
SampleKey = int | tuple[int, int]


# Image sides are checked against a bound so that absurd JSON integers fail here, not in numpy.
_MAX_SIDE = 2**31
_SIDE_RULE = "a positive integer below 2**31"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_MAX_ID = 2**63  # ids are indexed as int64


def _is_id(value: Any) -> bool:
    return _is_int(value) and -_MAX_ID <= value < _MAX_ID


_ID_RULE = "an integer within the 64-bit range"


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)


class COCODetection(Dataset):
    """A COCO-format detection dataset.

    Args:
        ann_file: COCO ``instances`` JSON (``images``, ``categories``, optional ``annotations``).
        image_root: folder that ``images[i].file_name`` is relative to.
        remove_images_without_annotations: drop images with no valid non-crowd box (True for training).
        transform: ``transform(image, boxes_xyxy, rng) -> (image, boxes_xyxy)``, e.g.
            :class:`atssdet.data.transforms.TrainTransform`; None returns the image as read.

    ``dataset[i]`` (or ``dataset[(i, seed)]``) returns ``(image, target)``: image BGR uint8
    ``[H, W, 3]`` after the transform, target a :class:`DetectionTarget`. With a plain index the
    transform's generator is freshly seeded from the OS (not reproducible); the batch samplers of
    :mod:`atssdet.data.sampler` yield ``(index, seed)`` keys for reproducible augmentation.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        *,
        remove_images_without_annotations: bool,
        transform: Transform | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.transform = transform
        raw = _load_json(self.ann_file)
        src = str(self.ann_file)

        cats = _require_list(raw, "categories", src)
        cat_names: dict[int, str] = {}
        for i, cat in enumerate(cats):
            where = f"categories[{i}]"
            cat_id = _require_field(cat, "id", _is_id, _ID_RULE, src, where)
            name = _require_field(cat, "name", lambda v: isinstance(v, str), "a string", src, where)
            if cat_id in cat_names:
                raise DatasetError(f"{src}: {where}: duplicate category id {cat_id}")
            cat_names[cat_id] = name
        if not cat_names:
            raise DatasetError(f"{src}: 'categories' is empty; need at least one category")
        self.category_ids: tuple[int, ...] = tuple(sorted(cat_names))
        self.class_names: tuple[str, ...] = tuple(cat_names[c] for c in self.category_ids)
        self.label_to_category_id: tuple[int, ...] = self.category_ids  # label l -> category id
        self.category_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}

        infos: dict[int, ImageInfo] = {}
        for i, img in enumerate(_require_list(raw, "images", src)):
            # Fast path for well-formed entries; the checks below name the problem otherwise.
            if type(img) is dict:
                image_id, file_name = img.get("id"), img.get("file_name")
                height, width = img.get("height"), img.get("width")
                if (
                    type(image_id) is int
                    and -_MAX_ID <= image_id < _MAX_ID
                    and type(file_name) is str
                    and file_name
                    and type(height) is int
                    and type(width) is int
                    and 0 < height < _MAX_SIDE
                    and 0 < width < _MAX_SIDE
                    and image_id not in infos
                ):
                    infos[image_id] = ImageInfo(image_id, file_name, height, width)
                    continue
            where = f"images[{i}]"
            image_id = _require_field(img, "id", _is_id, _ID_RULE, src, where)
            where = f"images[{i}] (id {image_id})"
            file_name = _require_field(
                img, "file_name", lambda v: isinstance(v, str) and v != "", "a non-empty string", src, where
            )
            height = _require_field(
                img, "height", lambda v: _is_int(v) and 0 < v < _MAX_SIDE, _SIDE_RULE, src, where
            )
            width = _require_field(
                img, "width", lambda v: _is_int(v) and 0 < v < _MAX_SIDE, _SIDE_RULE, src, where
            )
            if image_id in infos:
                raise DatasetError(f"{src}: {where}: duplicate image id {image_id}")
            infos[image_id] = ImageInfo(image_id, file_name, height, width)

        anns = raw.get("annotations", [])
        if not isinstance(anns, list):
            raise DatasetError(f"{src}: 'annotations' must be a list, got {type(anns).__name__}")
        self._boxes, self._labels = self._index_annotations(anns, infos, src)

        ids = sorted(infos)
        if remove_images_without_annotations:
            ids = [k for k in ids if len(self._labels[k]) > 0]
        self.image_ids: list[int] = ids
        self._infos = infos

    def _index_annotations(
        self, anns: list[Any], infos: dict[int, ImageInfo], src: str
    ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Per-image valid targets: {image id: boxes float32 [M, 4] xyxy}, {image id: labels int64 [M]}.

        One pass pulls the four fields out of every annotation; checks, filtering and grouping are
        vectorised. Only when a check fails does :func:`_check_annotation` walk the list to name the
        first bad entry (COCO train2017's 860k annotations index in about the time pycocotools takes).
        """
        image_keys = np.array(sorted(infos), dtype=np.int64)
        cat_keys = np.array(self.category_ids, dtype=np.int64)
        n = len(anns)
        ok = True
        try:
            image_vals = [a["image_id"] for a in anns]
            cat_vals = [a["category_id"] for a in anns]
            bbox_vals = [a["bbox"] for a in anns]
            crowd_vals = [a.get("iscrowd", 0) for a in anns]
            image_col, cat_col = np.array(image_vals), np.array(cat_vals)
            bbox_col, crowd_col = np.array(bbox_vals), np.array(crowd_vals)
            # numpy turns a JSON true/false mixed with integers into 1/0; a bool is not an id or a coordinate
            ok = bool not in set(map(type, image_vals + cat_vals + crowd_vals))
            if ok and bbox_col.dtype.kind in "iuf":
                ok = bool not in {type(v) for box in bbox_vals for v in box}
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            ok = False
        if ok and n > 0:
            ok = (
                image_col.dtype.kind in "iu"
                and cat_col.dtype.kind in "iu"
                and crowd_col.dtype.kind in "iu"
                and bbox_col.dtype.kind in "iuf"
                and bbox_col.shape == (n, 4)
                and bool(np.isfinite(bbox_col).all())
                and bool(np.isin(crowd_col, (0, 1)).all())
                and bool(np.isin(image_col, image_keys).all())
                and bool(np.isin(cat_col, cat_keys).all())
            )
        if not ok:
            for i, ann in enumerate(anns):
                _check_annotation(i, ann, infos, self.category_id_to_label, src)
            raise DatasetError(f"{src}: malformed 'annotations'")  # pragma: no cover - checks above agree
        if n == 0:
            image_col = np.zeros(0, np.int64)
            cat_col = np.zeros(0, np.int64)
            bbox_col = np.zeros((0, 4), np.float64)
            crowd_col = np.zeros(0, np.int64)

        # MegEngine's filter on the JSON values, then xywh -> xyxy in float32 (no clipping).
        keep = (crowd_col == 0) & (bbox_col[:, 2] > 0) & (bbox_col[:, 3] > 0)
        boxes = bbox_col[keep].astype(np.float32)
        boxes[:, 2:] += boxes[:, :2]
        image_pos = np.searchsorted(image_keys, image_col[keep])
        labels = np.searchsorted(cat_keys, cat_col[keep]).astype(np.int64)
        heights = np.array([infos[int(k)].height for k in image_keys], dtype=np.float32)[image_pos]
        widths = np.array([infos[int(k)].width for k in image_keys], dtype=np.float32)[image_pos]
        # Also degenerate here: empty in float32, or no overlap with the image.
        valid = (
            (boxes[:, 2] > boxes[:, 0])
            & (boxes[:, 3] > boxes[:, 1])
            & (np.minimum(boxes[:, 2], widths) > np.maximum(boxes[:, 0], 0))
            & (np.minimum(boxes[:, 3], heights) > np.maximum(boxes[:, 1], 0))
        )
        boxes, labels, image_pos = boxes[valid], labels[valid], image_pos[valid]
        order = np.argsort(image_pos, kind="stable")  # keeps JSON order within an image
        boxes, labels = boxes[order], labels[order]
        ends = np.cumsum(np.bincount(image_pos, minlength=len(image_keys)))
        starts = ends - np.bincount(image_pos, minlength=len(image_keys))
        box_index = {int(k): boxes[a:b] for k, a, b in zip(image_keys, starts, ends, strict=True)}
        label_index = {int(k): labels[a:b] for k, a, b in zip(image_keys, starts, ends, strict=True)}
        return box_index, label_index

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> ImageInfo:
        """The JSON entry (id, file name, height, width) of item ``index``."""
        return self._infos[self.image_ids[index]]

    def image_path(self, index: int) -> Path:
        return self.image_root / self.image_info(index).file_name

    def aspect_ratios(self) -> np.ndarray:
        """Height / width of every item from the JSON (no image is read), float64 ``[len(self)]``."""
        return np.array(
            [self._infos[k].height / self._infos[k].width for k in self.image_ids], dtype=np.float64
        )

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Valid targets of item ``index`` in original pixels: (boxes float32 [M, 4] xyxy, labels int64 [M])."""
        image_id = self.image_ids[index]
        return self._boxes[image_id].copy(), self._labels[image_id].copy()

    def __getitem__(self, key: SampleKey) -> tuple[np.ndarray, DetectionTarget]:
        if isinstance(key, tuple):
            index, seed = key
            rng = np.random.default_rng(seed)
        else:
            index = key
            rng = np.random.default_rng()
        index = int(index)
        if not 0 <= index < len(self.image_ids):
            raise IndexError(f"index {index} out of range for {len(self.image_ids)} images")
        info = self.image_info(index)
        path = self.image_root / info.file_name
        image = read_image(path)
        if image.shape[:2] != (info.height, info.width):
            raise DatasetError(
                f"{path}: image is {image.shape[0]}x{image.shape[1]} (HxW) but {self.ann_file} says "
                f"{info.height}x{info.width} for image id {info.image_id}"
            )
        boxes, labels = self.annotations(index)
        if self.transform is not None:
            image, boxes = self.transform(image, boxes, rng)
        target: DetectionTarget = {
            "boxes": boxes.astype(np.float32, copy=False),
            "labels": labels,
            "image_id": info.image_id,
            "orig_hw": (info.height, info.width),
        }
        return image, target

    def __repr__(self) -> str:
        return (
            f"COCODetection({str(self.ann_file)!r}, {len(self)} images, {self.num_classes} classes, "
            f"transform={self.transform!r})"
        )


def _check_annotation(
    i: int, ann: Any, infos: dict[int, ImageInfo], category_id_to_label: dict[int, int], src: str
) -> None:
    """Raise a :class:`DatasetError` naming ``annotations[i]`` if it is malformed."""
    where = f"annotations[{i}]"
    if isinstance(ann, dict) and "id" in ann:
        where = f"annotations[{i}] (id {ann['id']})"
    image_id = _require_field(ann, "image_id", _is_int, "an integer", src, where)
    if image_id not in infos:
        raise DatasetError(f"{src}: {where}: image_id {image_id} is not in 'images'")
    cat_id = _require_field(ann, "category_id", _is_int, "an integer", src, where)
    if cat_id not in category_id_to_label:
        raise DatasetError(f"{src}: {where}: unknown category_id {cat_id} (not in 'categories')")
    bbox = _require_field(
        ann,
        "bbox",
        lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v),
        "a list of 4 numbers [x, y, w, h]",
        src,
        where,
    )
    if not all(_finite(x) for x in bbox):
        raise DatasetError(f"{src}: {where}: bbox {bbox} holds a non-finite value")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or not _is_int(iscrowd):
        raise DatasetError(f"{src}: {where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer too large for a float
        return False


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read annotation file: {exc.strerror or exc}") from exc
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise DatasetError(
            f"{path}: expected a JSON object with 'images' and 'categories', got {type(raw).__name__}"
        )
    return raw


def _require_list(raw: dict[str, Any], key: str, src: str) -> list[Any]:
    if key not in raw:
        raise DatasetError(f"{src}: missing top-level key {key!r}")
    value = raw[key]
    if not isinstance(value, list):
        raise DatasetError(f"{src}: {key!r} must be a list, got {type(value).__name__}")
    return value


def _require_field(
    entry: Any, key: str, check: Callable[[Any], bool], expected: str, src: str, where: str
) -> Any:
    if not isinstance(entry, dict):
        raise DatasetError(f"{src}: {where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DatasetError(f"{src}: {where}: missing key {key!r}")
    value = entry[key]
    if not check(value):
        raise DatasetError(f"{src}: {where}: {key!r} must be {expected}, got {value!r}")
    return value


def find_coco_split(root: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """Locate ``(ann_file, image_root)`` of ``split`` (e.g. "train", "val2017") under a dataset folder.

    Accepted layouts (first match wins): ``annotations/instances_{split}.json`` with images in
    ``{split}/`` or ``images/{split}/`` (COCO 2017 and :mod:`atssdet.data.synth`), or
    ``{split}.json`` / ``{split}/annotations.json`` with images in ``{split}/`` or ``{split}/images/``.
    """
    root = Path(root)
    ann_candidates = [
        root / "annotations" / f"instances_{split}.json",
        root / f"{split}.json",
        root / split / "annotations.json",
    ]
    img_candidates: Sequence[Path] = [root / split / "images", root / "images" / split, root / split]
    for ann in ann_candidates:
        if ann.is_file():
            for img in img_candidates:
                if img.is_dir():
                    return ann, img
            raise DatasetError(
                f"{root}: found {ann} but no image folder ({', '.join(map(str, img_candidates))})"
            )
    raise DatasetError(
        f"{root}: no annotation file for split {split!r} (looked for {', '.join(map(str, ann_candidates))})"
    )

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

The file is read and validated by :mod:`atssdet.data.coco_schema` (the rules ``data check`` and
``eval`` apply too); this module only turns the valid boxes into per-image training targets.

Every failure of one item (its image unreadable, of another size than the JSON says, or its
transform failing or running out of memory) raises :class:`~atssdet.data.image_io.ImageReadError`
or :class:`~atssdet.data.coco_records.DatasetError` naming the file, which the training loader's
``skip_unreadable`` path counts and skips (:mod:`atssdet.data.loader`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

import cv2
import numpy as np
from torch.utils.data import Dataset

from atssdet.data.coco_records import AnnotationTable, CocoFile, DatasetError, ImageRecord
from atssdet.data.coco_schema import load_coco_file
from atssdet.data.image_io import read_image
from atssdet.errors import cv2_message, describe_memory_error, is_memory_error


class DetectionTarget(TypedDict):
    """Per-image training target (numpy; :func:`atssdet.data.collate.collate_detection` makes tensors)."""

    boxes: np.ndarray  # float32 [M, 4] xyxy, pixels of the (transformed) image
    labels: np.ndarray  # int64 [M], 0..C-1
    image_id: int
    orig_hw: tuple[int, int]  # (H, W) of the image as stored on disk


# transform(image uint8 [H, W, 3], boxes float32 [M, 4], rng) -> (image, boxes)
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

# A dataset key: an index, or (index, seed) as yielded by the grouped batch sampler so that the
# random augmentation of every sample is reproducible whatever the number of DataLoader workers.
SampleKey = int | tuple[int, int]


class COCODetection(Dataset):
    """A COCO-format detection dataset.

    Args:
        ann_file: COCO ``instances`` JSON (``images``, ``categories``, optional ``annotations``), or
            a :class:`~atssdet.data.coco_records.CocoFile` already validated by the schema.
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
        ann_file: str | os.PathLike[str] | CocoFile,
        image_root: str | os.PathLike[str],
        *,
        remove_images_without_annotations: bool,
        transform: Transform | None = None,
    ) -> None:
        if isinstance(ann_file, CocoFile):  # already validated (e.g. a YOLO/VOC/CVAT split, data.formats)
            coco = ann_file.raise_if_fatal()
            self.ann_file = Path(coco.source)
        else:
            self.ann_file = Path(ann_file)
            coco = load_coco_file(self.ann_file)  # the schema: refuses what data check and eval refuse
        self.image_root = Path(image_root)
        self.transform = transform
        self.category_ids: tuple[int, ...] = tuple(sorted(coco.categories))
        self.class_names: tuple[str, ...] = tuple(coco.categories[c] for c in self.category_ids)
        self.label_to_category_id: tuple[int, ...] = self.category_ids  # label l -> category id
        self.category_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}
        self._infos = coco.images
        self._boxes, self._labels = self._index_targets(coco.annotations)
        ids = sorted(self._infos)
        if remove_images_without_annotations:
            ids = [k for k in ids if len(self._labels[k]) > 0]
        self.image_ids: list[int] = ids

    def _index_targets(self, table: AnnotationTable) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Per-image targets: {image id: boxes float32 [M, 4] xyxy}, {image id: labels int64 [M]}.

        The schema's trainable boxes (MegEngine's filter plus the float32 and outside-image rules),
        grouped by image with one vectorised sort.
        """
        image_keys = np.array(sorted(self._infos), dtype=np.int64)
        keep = table.trainable
        boxes = table.boxes_xyxy[keep]
        labels = np.searchsorted(np.array(self.category_ids, dtype=np.int64), table.category_ids[keep])
        image_pos = np.searchsorted(image_keys, table.image_ids[keep])
        order = np.argsort(image_pos, kind="stable")  # keeps JSON order within an image
        boxes, labels = boxes[order], labels[order].astype(np.int64)
        counts = np.bincount(image_pos, minlength=len(image_keys))
        ends = np.cumsum(counts)
        starts = ends - counts
        box_index = {int(k): boxes[a:b] for k, a, b in zip(image_keys, starts, ends, strict=True)}
        label_index = {int(k): labels[a:b] for k, a, b in zip(image_keys, starts, ends, strict=True)}
        return box_index, label_index

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> ImageRecord:
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
            try:
                image, boxes = self.transform(image, boxes, rng)
            except (cv2.error, MemoryError, ValueError) as exc:  # this item alone: the loader skips it
                problem = describe_memory_error(exc) if is_memory_error(exc) else cv2_message(exc)
                raise DatasetError(
                    f"{path}: cannot transform the {info.width}x{info.height} image (id {info.image_id}): "
                    f"{problem}"
                ) from exc
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

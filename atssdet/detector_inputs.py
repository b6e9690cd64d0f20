"""One input of :meth:`atssdet.detector.Detector.iter_predict`, read and resized: :func:`prepare_input`.

Plain functions of plain values (no model), so that DataLoader worker processes can run them
(``Detector.iter_predict(..., workers=N)``, ``atssdet predict --workers N``) as well as the
calling thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from atssdet.data.image_io import read_image
from atssdet.data.transforms import resize_shortest_edge
from atssdet.errors import ImageReadError, cv2_message, describe_memory_error, is_memory_error
from atssdet.structures import Detections

if TYPE_CHECKING:
    from atssdet.detector import Detector

logger = logging.getLogger("atssdet.detector")  # one logger for the detector's warnings (the CLI quiets it)

ImageInput: TypeAlias = "str | os.PathLike[str] | np.ndarray"  # a file path or a BGR uint8 [H, W, 3] array


@dataclass
class _Pending:
    index: int
    source: str
    image: np.ndarray | None  # original BGR uint8 [H, W, 3] (None when only its size is known)
    resized: np.ndarray  # BGR uint8 [h, w, 3]
    keep_image: bool
    orig_hw: tuple[int, int]


def prepare_input(
    index: int,
    item: ImageInput,
    short_size: int,
    max_size: int,
    keep_image: bool,
    class_names: Sequence[str],
) -> _Pending | Detections:
    """Read/validate input ``index`` and resize it (MegEngine's test resize); an unreadable one
    becomes an error result. A function of plain values, so DataLoader workers can run it."""
    if isinstance(item, np.ndarray):
        source = f"<array {index}>"
        try:
            image = check_array(item, source)
        except ImageReadError as exc:
            return error_result(source, str(exc), class_names)
        keep_image = True
    else:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(
                f"input {index}: expected a file path or a BGR uint8 numpy array, got {type(item).__name__}"
            )
        source = os.fspath(item)
        try:
            image = read_image(source)
        except ImageReadError as exc:
            return error_result(source, str(exc), class_names)
    try:
        resized = resize_shortest_edge(image, short_size, max_size)
    except (cv2.error, MemoryError, ValueError) as exc:  # this image alone: the others go on
        problem = describe_memory_error(exc) if is_memory_error(exc) else cv2_message(exc)
        h, w = image.shape[:2]
        return error_result(source, f"{source}: cannot resize the {w}x{h} image: {problem}", class_names)
    orig_hw = (int(image.shape[0]), int(image.shape[1]))
    return _Pending(index, source, image if keep_image else None, resized, keep_image, orig_hw)


def error_result(source: str, message: str, class_names: Sequence[str]) -> Detections:
    """An empty result with ``error`` set (and a logged warning)."""
    logger.warning("skipping %s", message)
    return Detections(
        torch.zeros((0, 4)),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        class_names=tuple(class_names),
        source=source,
        error=message,
    )


class PrepareDataset(Dataset):
    """The inputs of one :meth:`Detector.iter_predict` call for DataLoader workers (sizes only, not the model)."""

    def __init__(self, items: list[ImageInput], detector: Detector, keep_images: bool) -> None:
        self.items, self.keep_images = items, keep_images
        self.sizes = (detector.short_size, detector.max_size)
        self.class_names = detector.cfg.class_names

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Pending | Detections:
        return prepare_input(index, self.items[index], *self.sizes, self.keep_images, self.class_names)


def no_collate(item: Any) -> Any:
    return item


def check_array(image: np.ndarray, source: str) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ImageReadError(f"{source}: expected a uint8 BGR image, got dtype {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"{source}: expected a BGR image [H, W, 3], got shape {image.shape}")
    return image

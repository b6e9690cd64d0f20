"""Reading images exactly as ``cv2.imread(path)`` would (BGR uint8), with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np


class ImageReadError(ValueError):
    """An image that cannot be decoded; the message names the file and the reason."""


def decode_image(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to BGR uint8 ``[H, W, 3]`` like ``cv2.imread`` (grey/alpha/16-bit/EXIF handled by OpenCV)."""
    if len(data) == 0:
        raise ImageReadError(f"{source}: empty file (0 bytes)")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(f"{source}: not a decodable image (corrupt, truncated or unsupported format)")
    return image


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read ``path`` into BGR uint8 ``[H, W, 3]``; raises :class:`ImageReadError` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return decode_image(data, source=str(path))

"""Image/box transforms as plain functions on numpy arrays (images BGR uint8 ``[H, W, 3]``)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor


def get_hw_by_short_size(im_height: int, im_width: int, short_size: int, max_size: int) -> tuple[int, int]:
    """Resized (h, w): scale = short/min side, capped so the long side <= max; Python ``round`` (halves to even)."""
    im_size_min = min(im_height, im_width)
    im_size_max = max(im_height, im_width)
    scale = (short_size + 0.0) / im_size_min
    if scale * im_size_max > max_size:
        scale = (max_size + 0.0) / im_size_max
    return int(round(im_height * scale)), int(round(im_width * scale))


def resize_shortest_edge(image: np.ndarray, short_size: int, max_size: int) -> np.ndarray:
    """Resize like MegEngine: ``cv2.resize(INTER_LINEAR)`` on uint8 to :func:`get_hw_by_short_size`."""
    h, w = get_hw_by_short_size(image.shape[0], image.shape[1], short_size, max_size)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def images_to_batch(images: Sequence[np.ndarray], *, device: torch.device | str | None = None) -> Tensor:
    """Stack BGR uint8 ``[H_i, W_i, 3]`` images into float ``[N, 3, H_max, W_max]``, zero-padded bottom/right.

    The model pads further to /32 and normalises; raw pixels are padded with 0 as in MegEngine.
    """
    if not images:
        raise ValueError("images_to_batch needs at least one image")
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    batch = torch.zeros((len(images), 3, h, w), dtype=torch.float32, device=device)
    for i, im in enumerate(images):
        t = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).to(
            device=device, dtype=torch.float32
        )
        batch[i, :, : im.shape[0], : im.shape[1]] = t
    return batch

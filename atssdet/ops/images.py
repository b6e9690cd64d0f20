"""Image-tensor helpers used inside the model (images are float BGR 0-255, NCHW)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pad_to_multiple(images: Tensor, multiple: int = 32, value: float = 0.0) -> Tensor:
    """Pad ``[N, C, H, W]`` at the bottom and right so H and W are multiples of ``multiple``.

    MegEngine pads raw pixels with 0 and normalises afterwards, so padded pixels end up at -mean/std.
    """
    h, w = images.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), value=value)

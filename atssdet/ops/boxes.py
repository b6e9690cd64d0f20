"""Box conventions, written once: absolute-pixel ``xyxy`` with no ``+1`` anywhere.

``ltrb`` distances are measured from a point to the four box sides: ``(px - x1, py - y1, x2 - px, y2 - py)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ltrb_to_xyxy(points_xy: Tensor, ltrb: Tensor) -> Tensor:
    """Decode distances ``[..., A, 4]`` around points ``[A, 2]`` into boxes ``[..., A, 4]``."""
    x = points_xy[..., 0]
    y = points_xy[..., 1]
    return torch.stack((x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]), dim=-1)


def xyxy_to_ltrb(points_xy: Tensor, boxes_xyxy: Tensor) -> Tensor:
    """Encode boxes ``[..., A, 4]`` as distances from points ``[A, 2]`` (negative when outside)."""
    x = points_xy[..., 0]
    y = points_xy[..., 1]
    return torch.stack(
        (x - boxes_xyxy[..., 0], y - boxes_xyxy[..., 1], boxes_xyxy[..., 2] - x, boxes_xyxy[..., 3] - y),
        dim=-1,
    )

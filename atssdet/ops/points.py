"""Anchor points: one per feature-map cell, at ``((j + offset) * stride, (i + offset) * stride)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def grid_points(
    feature_hw: Sequence[tuple[int, int]],
    strides: Sequence[int],
    *,
    offset: float = 0.5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Points per level, each ``[H_l * W_l, 2]`` as (x, y), row-major (y outer) like MegEngine."""
    out: list[Tensor] = []
    for (h, w), s in zip(feature_hw, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=dtype) + offset) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + offset) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1))
    return out

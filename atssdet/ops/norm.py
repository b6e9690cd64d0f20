"""GroupNorm with MegEngine's CPU rounding (``numerics="megengine"``), forward and backward.

MegEngine runs ``GroupNorm`` on CPU with its reference kernel: per (image, group) a two-pass mean and
population variance, each a *sequential* float32 sum over the group's ``D x H x W`` values, then
``y = s * x + b`` with ``s = weight / sqrt(var + eps)`` and ``b = bias - s * mean``. The backward pass
uses sequential float32 sums of ``dy`` and ``x * dy`` per channel. PyTorch's kernel sums pairwise and
is more accurate; over the ~10^5 values of a P3 group at 800 px the two differ by ~1e-5 relative,
which is most of the gap between a PyTorch forward pass and MegEngine's stored outputs.

:func:`megengine_group_norm` reproduces that arithmetic operation by operation. Sequential sums cannot
be vectorised across their own axis, so it computes on the CPU with NumPy (``np.cumsum`` with a float32
accumulator is a strict left-to-right recurrence), vectorised over images, groups and channels. It is
a parity tool: use PyTorch's GroupNorm
(``numerics="torch"``, the default) for speed and accuracy. On any other device than the CPU it is
refused (:func:`check_megengine_numerics_device`): every head activation would cross to the host and
back, and MegEngine's numbers are CPU numbers anyway.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_megengine_numerics_device", "megengine_group_norm"]

_F32 = np.float32


def _sequential_sum(values: np.ndarray, axis: int) -> np.ndarray:
    """Left-to-right float32 sum along ``axis`` (``acc += v`` in order, as a C loop does)."""
    return np.take(np.cumsum(values, axis=axis, dtype=_F32), -1, axis=axis)


def _forward(
    x: np.ndarray, num_groups: int, weight: np.ndarray, bias: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x [N, C, H, W]`` -> ``(y [N, C, H, W], mean [N, G], inv_std [N, G])``, all float32."""
    n, c = x.shape[:2]
    g = num_groups
    d = c // g
    rows = x.reshape(n * g, -1)  # NCHW: a group's D*H*W values are contiguous, in kernel order
    count = _F32(rows.shape[1])
    mean = _sequential_sum(rows, 1) / count
    centred = rows - mean[:, None]
    var = _sequential_sum(centred * centred, 1) / count
    inv_std = _F32(1.0) / np.sqrt(var + _F32(eps))
    s = inv_std.reshape(n, g, 1) * weight.reshape(1, g, d)  # [N, G, D]
    b = -s * mean.reshape(n, g, 1) + bias.reshape(1, g, d)
    y = s.reshape(n, c, 1, 1) * x + b.reshape(n, c, 1, 1)
    return y.astype(_F32, copy=False), mean.reshape(n, g), inv_std.reshape(n, g)


def _backward(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray, mean: np.ndarray, inv_std: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx [N, C, H, W], dweight [C], dbias [C])`` in MegEngine's order of operations."""
    n, c, h, w = x.shape
    g = mean.shape[1]
    d = c // g
    dy_rows = dy.reshape(n, c, h * w)
    db = _sequential_sum(dy_rows, 2)  # [N, C]
    ds = _sequential_sum(x.reshape(n, c, h * w) * dy_rows, 2)
    scale = _F32(1.0) / _F32(d * h * w)
    wg = weight.reshape(1, g, d)
    ds_v = _sequential_sum(ds.reshape(n, g, d) * wg, 2)  # [N, G]
    db_v = _sequential_sum(db.reshape(n, g, d) * wg, 2)
    c2 = (db_v * mean - ds_v) * inv_std * inv_std * inv_std * scale
    c3 = -c2 * mean - db_v * inv_std * scale
    c1 = inv_std.reshape(n, g, 1) * wg  # [N, G, D]
    dx = c1.reshape(n, c, 1, 1) * dy + np.repeat(c2, d, axis=1).reshape(n, c, 1, 1) * x
    dx = dx + np.repeat(c3, d, axis=1).reshape(n, c, 1, 1)
    mean_c = np.repeat(mean, d, axis=1)  # [N, C]
    inv_std_c = np.repeat(inv_std, d, axis=1)
    dweight = _sequential_sum((ds - db * mean_c) * inv_std_c, 0)
    dbias = _sequential_sum(db, 0)
    return dx.astype(_F32, copy=False), dweight, dbias


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


class _MegEngineGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        x_np, w_np = _numpy(x), _numpy(weight)
        y, mean, inv_std = _forward(x_np, num_groups, w_np, _numpy(bias), eps)
        ctx.save_for_backward(x, weight)
        ctx.stats = (mean, inv_std)
        return torch.from_numpy(y).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        (dy,) = grads
        x, weight = ctx.saved_tensors
        mean, inv_std = ctx.stats
        dx, dweight, dbias = _backward(_numpy(dy), _numpy(x), _numpy(weight), mean, inv_std)

        def back(a: np.ndarray, like: Tensor) -> Tensor:
            return torch.from_numpy(a).to(device=like.device, dtype=like.dtype)

        return back(dx, x), None, back(dweight, weight), back(dbias, weight), None


def check_megengine_numerics_device(device: torch.device) -> None:
    """Raise ValueError unless ``device`` is the CPU, the only place ``numerics="megengine"`` runs."""
    if device.type != "cpu":
        raise ValueError(
            f"numerics='megengine' computes GroupNorm with NumPy on the CPU (MegEngine's CPU rounding, a "
            f"parity tool); on {device} every head activation would go to the host and back. Use "
            "numerics='torch' (the default) on a GPU, or run the parity model on device='cpu'"
        )


def megengine_group_norm(
    x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-5
) -> Tensor:
    """GroupNorm of ``x [N, C, H, W]`` (affine ``weight``/``bias [C]``) rounded as MegEngine's CPU kernel.

    Differentiable (MegEngine's backward formulas); computed in float32 with NumPy, returned in the
    input's dtype. ``x`` must be on the CPU (:func:`check_megengine_numerics_device`).
    """
    check_megengine_numerics_device(x.device)
    if x.dim() != 4 or x.shape[1] % num_groups:
        raise ValueError(
            f"expected [N, C, H, W] with C divisible by {num_groups} groups, got {tuple(x.shape)}"
        )
    out: Tensor = _MegEngineGroupNorm.apply(x, num_groups, weight, bias, eps)
    return out

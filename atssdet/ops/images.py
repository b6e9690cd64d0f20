"""Image-tensor helpers used inside the model (images are float BGR 0-255, NCHW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# OpenCV's fixed-point bilinear weights: INTER_RESIZE_COEF_BITS = 11.
_COEF_SCALE = 2048


def pad_to_multiple(images: Tensor, multiple: int, value: float = 0.0) -> Tensor:
    """Pad ``[N, C, H, W]`` at the bottom and right so H and W are multiples of ``multiple``.

    MegEngine pads raw pixels with 0 and normalises afterwards, so padded pixels end up at -mean/std.
    """
    h, w = images.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), value=value)


def _linear_taps(dst: Tensor, src: Tensor, *, clamp_weights: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OpenCV ``INTER_LINEAR`` source indices and 11-bit weights for ``dst`` outputs from ``src`` inputs.

    ``dst``/``src`` are 0-d int64 tensors (traceable). Returns ``(i0, i1, w0, w1)``, each ``[dst]``:
    ``out = in[i0] * w0 + in[i1] * w1`` with ``w0 + w1 == 2048``. Columns (``clamp_weights``) reset the
    fraction to 0 at the borders as OpenCV's horizontal pass does; rows keep it and only clip indices.
    """
    # 1-element tensors, not 0-d: the ONNX exporter would compute a 0-d division in float32.
    scale = 1.0 / (dst.double().reshape(1) / src.double().reshape(1))  # OpenCV: 1 / inv_scale, double
    # A tensor end keeps the length symbolic when traced for ONNX (torch accepts it; the stubs do not).
    steps = torch.arange(dst, device=dst.device, dtype=torch.float64)  # type: ignore[call-overload]
    pos = ((steps + 0.5) * scale - 0.5).float()
    idx = torch.floor(pos)
    frac = pos - idx
    i0 = idx.long()
    last = src - 1
    if clamp_weights:
        outside = (i0 < 0) | (i0 >= last)
        frac = torch.where(outside, torch.zeros_like(frac), frac)
        i0 = torch.minimum(torch.clamp(i0, min=0), last)
    i1 = torch.minimum(torch.clamp(i0 + 1, min=0), last)
    i0 = torch.minimum(torch.clamp(i0, min=0), last)
    w1 = torch.round(frac * _COEF_SCALE).long()  # saturate_cast<short>: round half to even
    w0 = torch.round((1.0 - frac) * _COEF_SCALE).long()
    return i0, i1, w0, w1


def resize_bilinear_opencv(image: Tensor, height: Tensor | int, width: Tensor | int) -> Tensor:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)`` for uint8, bit for bit.

    ``image`` uint8 ``[H, W, C]``; returns uint8 ``[height, width, C]``. Reproduces OpenCV's fixed-point
    path (11-bit weights, an integer horizontal pass, then the vertical pass of its SIMD kernel:
    ``((w0 * (r0 >> 4)) >> 16) + ((w1 * (r1 >> 4)) >> 16) + 2) >> 2``), checked against cv2.resize on
    up- and down-scales (tests/test_images.py). Plain tensor ops, so it runs on any device and traces
    into an ONNX graph with dynamic sizes (``atssdet export --raw-input``). No antialiasing, as
    OpenCV's INTER_LINEAR.
    """
    if image.dim() != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 [H, W, C] image, got {image.dtype} {tuple(image.shape)}")
    src_h, src_w = torch._shape_as_tensor(image)[:2].to(image.device)
    dst_h = torch.as_tensor(height, dtype=torch.int64, device=image.device)
    dst_w = torch.as_tensor(width, dtype=torch.int64, device=image.device)
    x0, x1, a0, a1 = _linear_taps(dst_w, src_w, clamp_weights=True)
    y0, y1, b0, b1 = _linear_taps(dst_h, src_h, clamp_weights=False)
    # Integer arithmetic carried in float64, where every value here (< 2^27) is exact and dividing by a
    # power of two then flooring is exactly the kernel's arithmetic shift. (ONNX integer division is
    # exported through float32, which is not exact at these magnitudes.)
    pixels = image.double()
    a0, a1, b0, b1 = a0.double(), a1.double(), b0.double(), b1.double()
    rows = pixels[:, x0] * a0[None, :, None] + pixels[:, x1] * a1[None, :, None]  # [H, w, C], <= 255 * 2048
    top = torch.floor(b0[:, None, None] * torch.floor(rows[y0] / 16) / 65536)
    bottom = torch.floor(b1[:, None, None] * torch.floor(rows[y1] / 16) / 65536)
    return torch.floor((top + bottom + 2) / 4).clamp(0, 255).to(torch.uint8)

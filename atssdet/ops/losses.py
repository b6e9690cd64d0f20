"""Loss terms of ATSS as pure tensor functions (no reduction across images is hidden in here).

Formulas follow MegEngine's ``layers/det/loss.py`` as used by ``models/atss.py``: sigmoid focal loss
(alpha 0.25, gamma 2), GIoU loss on ``ltrb`` distances and BCE-with-logits on the centerness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

# MegEngine clamps union and enclosing area with this eps in its GIoU loss (reference README section 5).
GIOU_EPS = 1e-8


def sigmoid_focal_loss_sum(
    logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Summed sigmoid focal loss (Lin et al. 2017) of ``logits`` ``[..., C]`` against 0/1 ``targets`` ``[..., C]``.

    Per element ``-alpha_t * (1 - p_t) ** gamma * log(p_t)``; returns a scalar (sum over every element).
    This is ``torchvision.ops.sigmoid_focal_loss(..., reduction="sum")``, which equals MegEngine's
    ``get_focal_loss`` (one-hot target, no ignore label) before its normalisation.
    """
    return _tv_sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="sum")


def giou_loss_ltrb(pred_ltrb: Tensor, target_ltrb: Tensor, points_xy: Tensor) -> Tensor:
    """Per-point GIoU loss ``1 - GIoU`` ``[K]`` of predicted vs target distances ``[K, 4]`` around ``points_xy`` ``[K, 2]``.

    Both ``ltrb`` are turned into absolute boxes around the point (as MegEngine does); areas of the
    predicted/target boxes are clamped at 0 width/height, the union and the enclosing area at >= 1e-8.
    """
    x = points_xy[:, 0]
    y = points_xy[:, 1]
    px1, py1 = x - pred_ltrb[:, 0], y - pred_ltrb[:, 1]
    px2, py2 = x + pred_ltrb[:, 2], y + pred_ltrb[:, 3]
    tx1, ty1 = x - target_ltrb[:, 0], y - target_ltrb[:, 1]
    tx2, ty2 = x + target_ltrb[:, 2], y + target_ltrb[:, 3]
    pred_area = (px2 - px1).clamp(min=0) * (py2 - py1).clamp(min=0)
    target_area = (tx2 - tx1).clamp(min=0) * (ty2 - ty1).clamp(min=0)
    inter_w = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0)
    inter_h = (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0)
    inter = inter_w * inter_h
    union = pred_area + target_area - inter
    iou = inter / union.clamp(min=GIOU_EPS)
    enclose_w = torch.maximum(px2, tx2) - torch.minimum(px1, tx1)
    enclose_h = torch.maximum(py2, ty2) - torch.minimum(py1, ty1)
    enclose = enclose_w * enclose_h
    giou = iou - (enclose - union) / enclose.clamp(min=GIOU_EPS)
    return 1.0 - giou


def centerness_target(ltrb: Tensor) -> Tensor:
    """FCOS/ATSS centerness ``[...]`` of distances ``[..., 4]``.

    ``sqrt(clip(min(l, r) / max(l, r), 0) * clip(min(t, b) / max(t, b), 0))``, the operation order of
    MegEngine's ``models/atss.py`` (so float32 results match bit for bit). A side whose two distances
    are both 0 (a point on a degenerate box) gives 0 instead of 0/0 = NaN.
    """
    left_right = ltrb[..., 0::2]
    top_bottom = ltrb[..., 1::2]
    lr_max = left_right.max(dim=-1).values
    tb_max = top_bottom.max(dim=-1).values
    lr = left_right.min(dim=-1).values / torch.where(lr_max == 0, torch.ones_like(lr_max), lr_max)
    tb = top_bottom.min(dim=-1).values / torch.where(tb_max == 0, torch.ones_like(tb_max), tb_max)
    product = lr.clamp(min=0) * tb.clamp(min=0)
    if product.dtype == torch.float32 and product.device.type == "cpu":
        # torch's vectorised float32 sqrt on CPU is not always correctly rounded (1 ulp off for ~20% of
        # inputs here); a float64 sqrt rounded to float32 is, and matches MegEngine/numpy bit for bit.
        return torch.sqrt(product.double()).float()
    return torch.sqrt(product)


def bce_with_logits_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed binary cross-entropy with logits of ``logits`` ``[K]`` against soft ``targets`` ``[K]`` in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum")

"""ATSS training losses: :func:`atss_loss` on raw predictions (the seed's call is :mod:`atssdet.compat`).

``losses = atss_loss(model(images), targets, cfg)`` with MegEngine's normalisers (``models/atss.py``):

* ``loss_cls``  = sum of sigmoid focal loss over all points x classes / max(num_fg, 1)
* ``loss_bbox`` = sum_fg GIoU loss * centerness target / max(sum_ctr, 1e-5) * ``cfg.loss_bbox_weight``
* ``loss_ctr``  = sum_fg BCE-with-logits(centerness logit, centerness target) / max(num_fg, 1)
* ``total_loss`` = the sum of the three.

``num_fg`` and ``sum_ctr`` are detached and, under ``torch.distributed``, averaged over ranks
(all_reduce / world_size) so that every rank uses the same normaliser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from atssdet.assign import atss_assign
from atssdet.config import ATSSConfig
from atssdet.modeling.atss import ATSSOutput
from atssdet.ops.losses import bce_with_logits_sum, giou_loss_ltrb, sigmoid_focal_loss_sum

# The losses atss_loss returns, in the order training logs and checkpoints them.
LOSS_KEYS = ("total_loss", "loss_cls", "loss_bbox", "loss_ctr")


def _autocast_off(device: torch.device) -> torch.autocast:
    """Autocast disabled on ``device`` (on device types autocast does not know, the CPU's: a no-op)."""
    known = torch.amp.is_autocast_available(device.type)
    return torch.autocast(device_type=device.type if known else "cpu", enabled=False)


def _mean_over_ranks(value: Tensor) -> Tensor:
    """Average a detached scalar over ranks when ``torch.distributed`` is initialised (else unchanged)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def pad_targets(
    targets: Sequence[Mapping[str, Tensor]], *, num_classes: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image ``{"boxes": [M_i, 4], "labels": [M_i]}`` -> ``(boxes [N, M, 4], labels [N, M], valid [N, M])`` on ``device``.

    M = max M_i; padding slots have zero boxes, label -1 and ``valid`` False. Raises ValueError naming
    the image and field when a target is malformed. Targets on the CPU (a DataLoader's, or lists) are
    checked and padded there and moved in one copy, so no device value is ever read on the host;
    targets already on a device cost one read (every image's value checks at once).
    """
    boxes_list: list[Tensor] = []
    labels_list: list[Tensor] = []
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}] must have 'boxes' and 'labels', got keys {sorted(target)}")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32)
        labels = torch.as_tensor(target["labels"])
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be [M, 4] xyxy, got shape {tuple(boxes.shape)}")
        if labels.shape != (boxes.shape[0],):
            raise ValueError(
                f"targets[{i}]['labels'] must be [M] = [{boxes.shape[0]}], got shape {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise ValueError(f"targets[{i}]['labels'] must be integer class ids 0..{num_classes - 1}")
        boxes_list.append(boxes)
        labels_list.append(labels.long())
    on_host = all(t.device.type == "cpu" for t in (*boxes_list, *labels_list))
    staging = torch.device("cpu") if on_host else device
    boxes_list = [b.to(staging) for b in boxes_list]
    labels_list = [lab.to(staging) for lab in labels_list]
    _check_target_values(boxes_list, labels_list, num_classes=num_classes)
    n = len(boxes_list)
    m = max((b.shape[0] for b in boxes_list), default=0)
    gt_boxes = torch.zeros((n, m, 4), dtype=torch.float32, device=staging)
    gt_labels = torch.full((n, m), -1, dtype=torch.long, device=staging)
    gt_valid = torch.zeros((n, m), dtype=torch.bool, device=staging)
    for i, (boxes, labels) in enumerate(zip(boxes_list, labels_list, strict=True)):
        gt_boxes[i, : boxes.shape[0]] = boxes
        gt_labels[i, : labels.shape[0]] = labels
        gt_valid[i, : boxes.shape[0]] = True
    return gt_boxes.to(device), gt_labels.to(device), gt_valid.to(device)


def _check_target_values(boxes_list: list[Tensor], labels_list: list[Tensor], *, num_classes: int) -> None:
    """Labels in 0..C-1 and finite boxes: one host read for all images, then per image for the message."""
    flags = [
        ((labels < 0) | (labels >= num_classes)).any() | ~torch.isfinite(boxes).all()
        for boxes, labels in zip(boxes_list, labels_list, strict=True)
    ]
    if not flags or not bool(torch.stack(flags).any()):
        return
    for i, (boxes, labels) in enumerate(zip(boxes_list, labels_list, strict=True)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] must lie in 0..{num_classes - 1}, "
                f"got {int(labels.min())}..{int(labels.max())}"
            )
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"targets[{i}]['boxes'] contains NaN or inf")


def atss_loss(
    output: ATSSOutput, targets: Sequence[Mapping[str, Tensor]], cfg: ATSSConfig
) -> dict[str, Tensor]:
    """ATSS losses of raw predictions ``output`` (N images) against ``targets`` (one mapping per image).

    Args:
        output: :class:`ATSSOutput` of ``ATSS.forward`` (cls_logits ``[N, A, C]``, box_ltrb ``[N, A, 4]``,
            ctr_logits ``[N, A]``, points ``[A, 2]``).
        targets: N mappings with ``"boxes"`` ``[M_i, 4]`` float xyxy in input pixels (of the resized,
            possibly flipped image, before padding) and ``"labels"`` ``[M_i]`` int64 in 0..C-1.
            ``M_i = 0`` is allowed (all points are background).
        cfg: uses ``stride``, ``anchor_scale``, ``anchor_topk``, ``num_classes``, ``focal_loss_alpha``,
            ``focal_loss_gamma``, ``iou_loss_type`` ("giou") and ``loss_bbox_weight``.

    Returns:
        ``total_loss``, ``loss_cls``, ``loss_bbox``, ``loss_ctr`` (float32 scalars with grad) and
        ``num_fg`` (detached float32 scalar, the rank-averaged positive count).

    Computed in float32 even under autocast (the focal sum runs over N*A*C terms).
    """
    if cfg.iou_loss_type != "giou":
        raise ValueError(f"iou_loss_type {cfg.iou_loss_type!r} is not supported (only 'giou', as in the zoo)")
    n, a, c = output.cls_logits.shape
    if c != cfg.num_classes:
        raise ValueError(f"output has {c} classes but cfg.num_classes is {cfg.num_classes}")
    if len(targets) != n:
        raise ValueError(f"got {len(targets)} targets for a batch of {n} images")
    device = output.cls_logits.device
    gt_boxes, gt_labels, gt_valid = pad_targets(targets, num_classes=c, device=device)

    assignment = atss_assign(
        output.points.detach(),
        output.num_points_per_level,
        cfg.stride,
        gt_boxes,
        gt_valid,
        anchor_scale=float(cfg.anchor_scale),
        topk=cfg.anchor_topk,
    )
    foreground = assignment.matched_gt >= 0  # [N, A]
    # One nonzero (a device sync on a GPU: its size is data-dependent); every foreground selection
    # below reuses these indices, which list the points in the order a boolean mask would.
    image_idx, point_idx = foreground.nonzero(as_tuple=True)  # [F] each
    cls_targets = torch.zeros((n, a, c), dtype=torch.float32, device=device)
    if gt_labels.shape[1]:
        matched_labels = torch.gather(gt_labels, 1, assignment.matched_gt.clamp(min=0))
        cls_targets[image_idx, point_idx, matched_labels[image_idx, point_idx]] = 1.0

    with _autocast_off(device):
        cls_logits = output.cls_logits.float()
        box_ltrb = output.box_ltrb.float()
        ctr_logits = output.ctr_logits.float()

        fg_ctr_targets = assignment.target_ctrness[image_idx, point_idx]  # [F]
        num_fg = _mean_over_ranks(foreground.sum().to(torch.float32))
        sum_ctr = _mean_over_ranks(fg_ctr_targets.sum().detach())

        loss_cls = sigmoid_focal_loss_sum(
            cls_logits, cls_targets, alpha=cfg.focal_loss_alpha, gamma=cfg.focal_loss_gamma
        ) / num_fg.clamp(min=1.0)
        fg_points = output.points.float()[point_idx]  # [F, 2]
        giou = giou_loss_ltrb(
            box_ltrb[image_idx, point_idx], assignment.target_ltrb[image_idx, point_idx], fg_points
        )  # [F]
        loss_bbox = (giou * fg_ctr_targets).sum() / sum_ctr.clamp(min=1e-5) * cfg.loss_bbox_weight
        loss_ctr = bce_with_logits_sum(ctr_logits[image_idx, point_idx], fg_ctr_targets) / num_fg.clamp(
            min=1.0
        )
        total_loss = loss_cls + loss_bbox + loss_ctr
    return {
        "total_loss": total_loss,
        "loss_cls": loss_cls,
        "loss_bbox": loss_bbox,
        "loss_ctr": loss_ctr,
        "num_fg": num_fg.detach(),
    }

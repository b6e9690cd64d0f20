"""From raw dense predictions to detections, reproducing MegEngine's ``DetEvaluator.predict``.

Each image is one vectorised pass (torchvision ``batched_nms`` keyed by class); no Python loop over
classes or boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from atssdet.modeling.atss import ATSSOutput
from atssdet.ops.boxes import ltrb_to_xyxy
from atssdet.structures import Detections


def dense_scores_and_boxes(output: ATSSOutput, image_hw: Tensor, orig_hw: Tensor) -> tuple[Tensor, Tensor]:
    """Scores ``[N, A, C]`` and boxes ``[N, A, 4]`` in original-image pixels.

    ``image_hw``/``orig_hw`` are ``[N, 2]`` (resized and original height, width). The score is
    ``sqrt(sigmoid(cls) * sigmoid(ctr))``; boxes are divided by the float32 ratio resized/original and
    clipped to ``[0, W] x [0, H]`` (MegEngine clips to W, not W-1).
    """
    scores = torch.sqrt(torch.sigmoid(output.cls_logits) * torch.sigmoid(output.ctr_logits)[..., None])
    boxes = ltrb_to_xyxy(output.points, output.box_ltrb)
    image_hw = image_hw.to(boxes.device, torch.float32)
    orig_hw = orig_hw.to(boxes.device, torch.float32)
    ratio_h = image_hw[:, 0] / orig_hw[:, 0]
    ratio_w = image_hw[:, 1] / orig_hw[:, 1]
    ratio = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h), dim=1)[:, None, :]  # [N, 1, 4]
    boxes = boxes / ratio
    zero = torch.zeros_like(orig_hw[:, 0])
    lo = torch.stack((zero, zero, zero, zero), dim=1)[:, None, :]
    hi = torch.stack((orig_hw[:, 1], orig_hw[:, 0], orig_hw[:, 1], orig_hw[:, 0]), dim=1)[:, None, :]
    boxes = torch.minimum(torch.maximum(boxes, lo), hi)
    return scores, boxes


def select_detections(
    scores: Tensor,
    boxes: Tensor,
    *,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.6,
    max_detections: int = 100,
    class_agnostic: bool = False,
    classes: Tensor | None = None,
) -> list[Detections]:
    """Threshold, per-class NMS and top-k on dense ``scores [N, A, C]`` / ``boxes [N, A, 4]``.

    MegEngine order is kept: survivors are listed class by class (score-descending inside a class);
    only when more than ``max_detections`` survive are they stably sorted by score and cut.
    ``classes`` (optional ``[K]`` label ids) keeps only those classes.
    """
    n, _, c = scores.shape
    mask = scores > score_threshold
    if classes is not None:
        keep_class = torch.zeros(c, dtype=torch.bool, device=scores.device)
        keep_class[classes.to(scores.device)] = True
        mask &= keep_class
    results: list[Detections] = []
    # One batched_nms call per image: torchvision's CPU fallback loops over groups and scans every
    # candidate each time, so a single call keyed by (image, class) would cost O(N^2) in images.
    for i in range(n):
        anchor_idx, cls_idx = mask[i].nonzero(as_tuple=True)
        cand_scores = scores[i, anchor_idx, cls_idx]
        cand_boxes = boxes[i, anchor_idx]
        group = torch.zeros_like(cls_idx) if class_agnostic else cls_idx
        keep = batched_nms(cand_boxes.float(), cand_scores.float(), group, nms_threshold)  # score-descending
        # MegEngine lists survivors class by class; stable, so score order holds inside a class.
        keep = keep[torch.sort(cls_idx[keep], stable=True).indices]
        if keep.numel() > max_detections:
            order = torch.sort(cand_scores[keep], descending=True, stable=True).indices[:max_detections]
            keep = keep[order]
        results.append(Detections(cand_boxes[keep], cand_scores[keep], cls_idx[keep]))
    return results


def postprocess(
    output: ATSSOutput,
    image_hw: Tensor,
    orig_hw: Tensor,
    *,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.6,
    max_detections: int = 100,
    class_agnostic: bool = False,
    classes: Tensor | None = None,
) -> list[Detections]:
    """Raw model output -> one :class:`Detections` per image (see :func:`select_detections`)."""
    scores, boxes = dense_scores_and_boxes(output, image_hw, orig_hw)
    return select_detections(
        scores,
        boxes,
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        max_detections=max_detections,
        class_agnostic=class_agnostic,
        classes=classes,
    )

"""The modules :func:`atssdet.export.export_onnx` traces: the model's own forward and post-processing.

:class:`ExportGraph` is ``ATSS.forward`` followed by :func:`atssdet.postprocess.dense_scores_and_boxes`
(the functions PyTorch inference runs, not a copy of them) and, for an NMS export,
:func:`select_in_graph`, a traceable twin of :func:`atssdet.postprocess.select_detections` built on
ONNX ``NonMaxSuppression``. :class:`RawInputGraph` puts MegEngine's test resize in front.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from atssdet.modeling.atss import ATSS
from atssdet.ops.images import resize_bilinear_opencv
from atssdet.options import InferenceOptions
from atssdet.postprocess import dense_scores_and_boxes


def onnx_iou_threshold(iou_threshold: float) -> float:
    """The float32 threshold that makes ONNX Runtime's NMS decide like torchvision's.

    Both suppress when ``IoU > threshold``, but torchvision compares the float32 IoU with the threshold
    as a double while ONNX Runtime compares in float32: at IoU == float32(0.6) (e.g. 60/100)
    torchvision suppresses and ONNX Runtime with 0.6 does not. The largest float32 <= the threshold
    gives the same decision for every float32 IoU.
    """
    t32 = np.float32(iou_threshold)
    if float(t32) > iou_threshold:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return float(t32)


class _OnnxNMS(torch.autograd.Function):
    """ONNX ``NonMaxSuppression``: ``selected [K, 3]`` int64 rows (image, class, anchor).

    Eager semantics match ONNX Runtime's: per image and class, keep ``score > score_threshold``
    (strict), greedy NMS in score order suppressing ``IoU > iou_threshold`` (no +1, zero-area boxes
    never suppress), at most ``max_per_class`` per class; rows come image-major, then class-major,
    score-descending inside a class. The eager path only serves tracing and reference.
    """

    @staticmethod
    def forward(
        ctx: Any,
        boxes: Tensor,  # [N, A, 4]
        scores: Tensor,  # [N, C, A]
        max_per_class: int,
        iou_threshold: float,
        score_threshold: float,
    ) -> Tensor:
        img_idx, cls_idx, anchor_idx = (scores > score_threshold).nonzero(as_tuple=True)
        cand_scores = scores[img_idx, cls_idx, anchor_idx]
        group = img_idx * scores.shape[1] + cls_idx
        keep = batched_nms(boxes[img_idx, anchor_idx], cand_scores, group, iou_threshold)
        keep = keep[torch.sort(group[keep], stable=True).indices]
        # At most max_per_class per (image, class) group: rank inside the group.
        grp = group[keep]
        first = torch.searchsorted(grp, grp, right=False)
        rank = torch.arange(grp.numel(), device=grp.device) - first
        keep = keep[rank < max_per_class]
        return torch.stack((img_idx[keep], cls_idx[keep], anchor_idx[keep]), dim=1)

    @staticmethod
    def symbolic(
        g: Any, boxes: Any, scores: Any, max_per_class: int, iou_threshold: float, score_threshold: float
    ) -> Any:
        max_t = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64))
        iou_t = g.op(
            "Constant", value_t=torch.tensor([onnx_iou_threshold(iou_threshold)], dtype=torch.float32)
        )
        score_t = g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32))
        # center_point_box=0: corners; ONNX says (y1, x1, y2, x2) but IoU is symmetric in x/y, so xyxy works.
        return g.op("NonMaxSuppression", boxes, scores, max_t, iou_t, score_t, center_point_box_i=0)


def _stable_argsort(key: Tensor) -> Tensor:
    """Ascending argsort of ``key [S]``, ties kept in index order.

    The TorchScript exporter cannot export ``torch.sort(stable=True)``; ONNX ``TopK`` breaks ties
    by the lower index (ONNX spec, opset 11+), so an all-k TopK is a stable sort in the graph.
    """
    if torch.jit.is_tracing():
        return torch.topk(key, key.shape[0], largest=False, sorted=True).indices
    return torch.sort(key, stable=True).indices


def _nms_candidates(
    scores: Tensor, boxes: Tensor, options: InferenceOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ONNX NMS over ``scores [N, A, C]`` / ``boxes [N, A, 4]``: survivors' ``(image, label, score, box)``.

    Rows ``[S]`` (boxes ``[S, 4]``) come image-major, class-major, score-descending inside a class.
    """
    n, a, c = scores.shape
    if options.class_agnostic:
        # One NMS class holding every (anchor, class) candidate, as select_detections does.
        cand_boxes = boxes.unsqueeze(2).expand(n, a, c, 4).reshape(n, a * c, 4)
        cand_scores = scores.reshape(n, 1, a * c)
    else:
        cand_boxes = boxes
        cand_scores = scores.transpose(1, 2)
    # One more than K per class keeps the result exact: a class with > K survivors already makes
    # the image exceed K (score-sorted path) and its top K are all that can reach the final K.
    selected = _OnnxNMS.apply(
        cand_boxes, cand_scores, options.max_detections + 1, options.nms_threshold, options.score_threshold
    )
    img = selected[:, 0]
    if options.class_agnostic:
        anchor = selected[:, 2] // c
        label = selected[:, 2] % c
    else:
        anchor = selected[:, 2]
        label = selected[:, 1]
    det_scores = scores[img, anchor, label]  # [S]
    det_boxes = boxes[img, anchor]  # [S, 4]
    if options.class_agnostic:
        # NMS returned score order; class-major order is a stable sort by class.
        by_class = _stable_argsort(label)
        return img[by_class], label[by_class], det_scores[by_class], det_boxes[by_class]
    return img, label, det_scores, det_boxes


def select_in_graph(scores: Tensor, boxes: Tensor, options: InferenceOptions) -> tuple[Tensor, Tensor]:
    """Traceable :func:`~atssdet.postprocess.select_detections`: ``(detections [N, K, 6], num_detections [N])``.

    ``scores [N, A, C]``, ``boxes [N, A, 4]``; K = ``options.max_detections``; rows (x1, y1, x2, y2,
    score, class), zero-padded. Ordering as MegEngine: class-major (score-descending inside a class)
    when at most K survive, else the K best by a stable score sort. ONNX TopK breaks ties by the
    lower index, so the sorts below are stable in ONNX Runtime too (see :func:`_stable_argsort`).
    ``options.classes`` and ``flip_tta`` are not part of a graph (the caller refuses them).
    """
    n, k = scores.shape[0], options.max_detections
    img, label, det_scores, det_boxes = _nms_candidates(scores, boxes, options)
    position = torch.arange(det_scores.shape[0], device=scores.device)
    images = torch.arange(n, device=scores.device)
    counts = (img[:, None] == images[None, :]).sum(0)  # [N]
    over = counts[img] > k  # [S]
    # Within an image: by score when it has more than K survivors, else keep the (class-major) position.
    key = torch.where(over, -det_scores, position.to(det_scores.dtype))
    order = _stable_argsort(key)
    order = order[_stable_argsort(img[order])]
    img, label, det_scores, det_boxes = img[order], label[order], det_scores[order], det_boxes[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = position - starts[img]
    keep = rank < k
    rows = torch.cat((det_boxes, det_scores[:, None], label[:, None].to(det_scores.dtype)), dim=1)[keep]
    slot = (img * k + rank)[keep]
    detections = torch.zeros((n * k, 6), dtype=scores.dtype, device=scores.device)
    detections = detections.index_put((slot,), rows)
    return detections.reshape(n, k, 6), torch.clamp(counts, max=k)


class ExportGraph(nn.Module):
    """``(images, image_hw, orig_hw)`` -> the model's dense outputs, or its detections with ``nms``.

    ``images`` float32 ``[N, 3, H, W]`` raw BGR 0-255 (the model pads and normalises), ``image_hw`` /
    ``orig_hw`` ``[N, 2]``. Without ``nms``: ``scores [N, A, C]``, ``boxes [N, A, 4]`` xyxy in original
    pixels (:func:`~atssdet.postprocess.dense_scores_and_boxes` of ``model(images)``); with ``nms``
    (the thresholds baked in): :func:`select_in_graph` of those.
    """

    def __init__(self, model: ATSS, *, nms: InferenceOptions | None = None) -> None:
        super().__init__()
        self.model = model
        self.nms = nms

    def forward(self, images: Tensor, image_hw: Tensor, orig_hw: Tensor) -> tuple[Tensor, Tensor]:
        scores, boxes = dense_scores_and_boxes(self.model(images), image_hw, orig_hw)
        if self.nms is None:
            return scores, boxes
        return select_in_graph(scores, boxes, self.nms)


class RawInputGraph(nn.Module):
    """``image`` uint8 ``[H, W, 3]`` BGR (one image, any size, as ``cv2.imread`` gives it) -> the outputs
    of ``inner`` (an :class:`ExportGraph`) for it, with MegEngine's test resize inside the graph: the
    size rule of ``DetEvaluator.process_inputs`` and a bit-exact ``cv2.INTER_LINEAR``
    (:func:`atssdet.ops.images.resize_bilinear_opencv`); boxes come out in the image's pixels."""

    def __init__(self, inner: nn.Module, short_size: int, max_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.short_size = float(short_size)
        self.max_size = float(max_size)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        hw = torch._shape_as_tensor(image)[:2].to(device=image.device, dtype=torch.float64)
        # [1]-shaped, not 0-d: the ONNX exporter would compute 0-d arithmetic in float32.
        small = torch.amin(hw, dim=0, keepdim=True)
        large = torch.amax(hw, dim=0, keepdim=True)
        scale = self.short_size / small
        scale = torch.where(scale * large > self.max_size, self.max_size / large, scale)
        new_hw = torch.round(hw * scale).long()  # Python's round: halves to even, in float64
        resized = resize_bilinear_opencv(image, new_hw[0], new_hw[1])
        images = resized.permute(2, 0, 1).unsqueeze(0).float()
        result: tuple[Tensor, Tensor] = self.inner(
            images, new_hw.float().unsqueeze(0), hw.float().unsqueeze(0)
        )
        return result

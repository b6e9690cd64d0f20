"""ONNX export of ATSS (decoding and optionally NMS inside the graph); run exports with :mod:`atssdet.runtime.ort_runner`.

The exported graph takes the same inputs as the PyTorch pipeline::

    images    [N, 3, H, W] float32, raw BGR 0-255 (resized, zero-padded to the batch maximum;
              the graph pads further to a multiple of 32 and normalises, like :class:`ATSS`)
    image_hw  [N, 2] float32, resized (height, width) of each image inside the batch
    orig_hw   [N, 2] float32, original (height, width) each image's boxes are mapped back to

and returns either dense decoded predictions (``scores [N, A, C]``, ``boxes [N, A, 4]`` xyxy in
original pixels, exactly :func:`atssdet.postprocess.dense_scores_and_boxes`) or, with
``with_nms=True``, final detections (``detections [N, K, 6]`` rows (x1, y1, x2, y2, score, class),
zero-padded to ``K = max_detections``, plus ``num_detections [N]``) in the order of
:func:`atssdet.postprocess.select_detections`.

onnx and onnxruntime are optional (``pip install atssdet[export]``) and imported only here, lazily.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from atssdet.config import ATSSConfig
from atssdet.fileio import atomic_path
from atssdet.modeling.atss import ATSS, SIZE_DIVISIBILITY, ATSSOutput, flatten_levels
from atssdet.ops.images import pad_to_multiple, resize_bilinear_opencv
from atssdet.ops.points import grid_points
from atssdet.postprocess import dense_scores_and_boxes

INPUT_NAMES = ("images", "image_hw", "orig_hw")
RAW_INPUT_NAME = "image"  # --raw-input graphs: one uint8 [H, W, 3] BGR image
DENSE_OUTPUT_NAMES = ("scores", "boxes")
NMS_OUTPUT_NAMES = ("detections", "num_detections")
METADATA_PREFIX = "atssdet."


def _require(module: str) -> Any:
    """Import an optional dependency or fail with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"ONNX export/inference needs the optional package {module!r}: pip install 'atssdet[export]'"
        ) from exc


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


def _select_in_graph(
    scores: Tensor,  # [N, A, C]
    boxes: Tensor,  # [N, A, 4]
    *,
    score_threshold: float,
    nms_threshold: float,
    max_detections: int,
    class_agnostic: bool,
) -> tuple[Tensor, Tensor]:
    """Traceable :func:`select_detections`: ``(detections [N, K, 6], num_detections [N])``.

    Ordering as MegEngine: class-major (score-descending inside a class) when at most K survive,
    else the K best by a stable score sort. ONNX TopK breaks ties by
    the lower index, so the sorts below are stable in ONNX Runtime too (see :func:`_stable_argsort`).
    """
    n, a, c = scores.shape
    if class_agnostic:
        # One NMS class holding every (anchor, class) candidate, as select_detections does.
        cand_boxes = boxes.unsqueeze(2).expand(n, a, c, 4).reshape(n, a * c, 4)
        cand_scores = scores.reshape(n, 1, a * c)
    else:
        cand_boxes = boxes
        cand_scores = scores.transpose(1, 2)
    # One more than K per class keeps the result exact: a class with > K survivors already makes
    # the image exceed K (score-sorted path) and its top K are all that can reach the final K.
    selected = _OnnxNMS.apply(cand_boxes, cand_scores, max_detections + 1, nms_threshold, score_threshold)
    img = selected[:, 0]
    if class_agnostic:
        anchor = selected[:, 2] // c
        label = selected[:, 2] % c
    else:
        anchor = selected[:, 2]
        label = selected[:, 1]
    det_scores = scores[img, anchor, label]  # [S]
    det_boxes = boxes[img, anchor]  # [S, 4]
    position = torch.arange(det_scores.shape[0], device=scores.device)
    if class_agnostic:
        # NMS returned score order; class-major order is a stable sort by class.
        by_class = _stable_argsort(label)
        img, label, det_scores, det_boxes = (
            img[by_class],
            label[by_class],
            det_scores[by_class],
            det_boxes[by_class],
        )
    images = torch.arange(n, device=scores.device)
    counts = (img[:, None] == images[None, :]).sum(0)  # [N]
    over = counts[img] > max_detections  # [S]
    # Within an image: by score when it has more than K survivors, else keep the (class-major) position.
    key = torch.where(over, -det_scores, position.to(det_scores.dtype))
    order = _stable_argsort(key)
    order = order[_stable_argsort(img[order])]
    img, label, det_scores, det_boxes = img[order], label[order], det_scores[order], det_boxes[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = position - starts[img]
    keep = rank < max_detections
    rows = torch.cat((det_boxes, det_scores[:, None], label[:, None].to(det_scores.dtype)), dim=1)[keep]
    slot = (img * max_detections + rank)[keep]
    detections = torch.zeros((n * max_detections, 6), dtype=scores.dtype, device=scores.device)
    detections = detections.index_put((slot,), rows)
    num = torch.clamp(counts, max=max_detections)
    return detections.reshape(n, max_detections, 6), num


class _ExportGraph(nn.Module):
    """What gets traced: pad + model + decode (+ NMS), with every size read from the inputs."""

    def __init__(
        self,
        model: ATSS,
        *,
        with_nms: bool,
        score_threshold: float,
        nms_threshold: float,
        max_detections: int,
        class_agnostic: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.with_nms = with_nms
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.class_agnostic = class_agnostic

    def forward(self, images: Tensor, image_hw: Tensor, orig_hw: Tensor) -> tuple[Tensor, Tensor]:
        model = self.model
        # Padded here from traced sizes (the example input is never a multiple of 32, so the pad
        # op is recorded); the model's own pad then sees a multiple of 32 and is a no-op.
        x = model.normalize(pad_to_multiple(images.float(), SIZE_DIVISIBILITY))
        features = model.backbone(x)
        logits, offsets, ctrness = model.head(features)
        # ATSS.forward bakes the level sizes in as Python ints; recompute points from traced shapes
        # so they follow the input size.
        points = torch.cat(
            grid_points(
                [(f.shape[-2], f.shape[-1]) for f in features],
                model.cfg.stride,
                offset=model.cfg.anchor_offset,
                device=x.device,
            ),
            dim=0,
        )
        output = ATSSOutput(
            cls_logits=flatten_levels(logits),
            box_ltrb=flatten_levels(offsets),
            ctr_logits=flatten_levels(ctrness).squeeze(-1),
            points=points,
            num_points_per_level=(),
        )
        scores, boxes = dense_scores_and_boxes(output, image_hw, orig_hw)
        if not self.with_nms:
            return scores, boxes
        return _select_in_graph(
            scores,
            boxes,
            score_threshold=self.score_threshold,
            nms_threshold=self.nms_threshold,
            max_detections=self.max_detections,
            class_agnostic=self.class_agnostic,
        )


class _RawInputGraph(nn.Module):
    """``image`` uint8 ``[H, W, 3]`` BGR (one image, any size, as ``cv2.imread`` gives it) -> the outputs
    of :class:`_ExportGraph` for it, with MegEngine's test resize inside the graph: the size rule of
    ``DetEvaluator.process_inputs`` and a bit-exact ``cv2.INTER_LINEAR``
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
        return self.inner(images, new_hw.float().unsqueeze(0), hw.float().unsqueeze(0))


def export_metadata(
    cfg: ATSSConfig,
    *,
    with_nms: bool,
    score_threshold: float,
    nms_threshold: float,
    max_detections: int,
    class_agnostic: bool,
    model_name: str | None = None,
    raw_input: bool = False,
) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file (all values are strings, JSON where structured)."""
    from atssdet import __version__

    convention = {
        "images": "float32 [N, 3, H, W] raw BGR 0-255, resized, zero-padded bottom/right to the batch maximum",
        "image_hw": "float32 [N, 2] resized (height, width)",
        "orig_hw": "float32 [N, 2] original (height, width); boxes come out in these pixels",
        "channel_order": "BGR",
        "pixel_range": [0, 255],
        "pad_to_multiple": SIZE_DIVISIBILITY,
        "pad_inside_graph": True,
        "pad_value": 0.0,
        "normalize_inside_graph": True,
        "mean": list(cfg.img_mean),
        "std": list(cfg.img_std),
        "resize": f"shortest edge {cfg.test_image_short_size}, max {cfg.test_image_max_size}, "
        "cv2.INTER_LINEAR on uint8 (outside the graph)",
    }
    if raw_input:
        convention = {
            "image": "uint8 [H, W, 3] BGR, one image of any size (what cv2.imread returns)",
            "channel_order": "BGR",
            "resize": f"inside the graph: shortest edge {cfg.test_image_short_size}, max "
            f"{cfg.test_image_max_size}, bit-exact cv2.INTER_LINEAR on uint8",
            "pad_inside_graph": True,
            "normalize_inside_graph": True,
            "boxes": "in the input image's pixels",
            "batch": 1,
        }
    meta = {
        "atssdet_version": __version__,
        "model_name": model_name or "",
        "class_names": json.dumps(list(cfg.class_names)),
        "input_convention": json.dumps(convention),
        "mean": json.dumps(list(cfg.img_mean)),
        "std": json.dumps(list(cfg.img_std)),
        "strides": json.dumps(list(cfg.stride)),
        "config": cfg.to_json(),
        "outputs": "nms" if with_nms else "dense",
        "score_threshold": repr(float(score_threshold)),
        "nms_threshold": repr(float(nms_threshold)),
        "max_detections": str(int(max_detections)),
        "class_agnostic": json.dumps(bool(class_agnostic)),
        "input_format": "raw" if raw_input else "resized",
    }
    return {METADATA_PREFIX + k: v for k, v in meta.items()}


def export_onnx(
    model: ATSS,
    path: str | os.PathLike[str],
    *,
    dynamic: bool = True,
    with_nms: bool = False,
    opset: int = 17,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    max_detections: int | None = None,
    class_agnostic: bool = False,
    example_hw: tuple[int, int] = (213, 160),
    model_name: str | None = None,
    raw_input: bool = False,
) -> Path:
    """Export ``model`` to ONNX at ``path`` (written atomically) and return the path.

    Inputs ``images [N, 3, H, W]``, ``image_hw [N, 2]``, ``orig_hw [N, 2]`` (see the module doc).
    Outputs ``scores [N, A, C]``, ``boxes [N, A, 4]``; with ``with_nms`` ``detections [N, K, 6]`` and
    ``num_detections [N]`` (int64), K = ``max_detections``. Thresholds default to the config's
    ``test_cls_threshold``, ``test_nms`` and ``test_max_boxes_per_image``. ``dynamic`` makes N, H, W
    (and A) symbolic; otherwise the graph is fixed to ``example_hw`` and batch 1. Uses the
    TorchScript exporter (``dynamo=False``), which needs no extra packages.

    ``raw_input``: the graph takes one ``image`` uint8 ``[H, W, 3]`` BGR of any size instead and does
    the test resize itself, bit-exactly as ``cv2.resize`` (see :class:`_RawInputGraph`); outputs keep
    their names with batch 1. ``example_hw`` is then the example image's size.
    """
    onnx = _require("onnx")
    cfg = model.cfg
    if cfg.numerics != "torch":
        raise ValueError(
            f"numerics={cfg.numerics!r} computes GroupNorm with NumPy and cannot be traced to ONNX; "
            "export the model built with numerics='torch' (same weights)"
        )
    score_threshold = cfg.test_cls_threshold if score_threshold is None else score_threshold
    nms_threshold = cfg.test_nms if nms_threshold is None else nms_threshold
    max_detections = cfg.test_max_boxes_per_image if max_detections is None else max_detections
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    h, w = example_hw
    if dynamic and h % SIZE_DIVISIBILITY == 0 and w % SIZE_DIVISIBILITY == 0:
        # The pad op is recorded only if the example needs padding (see _ExportGraph.forward).
        raise ValueError(
            f"example_hw {example_hw}: at least one side must not be a multiple of {SIZE_DIVISIBILITY}"
        )
    graph: nn.Module = _ExportGraph(
        model,
        with_nms=with_nms,
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        max_detections=max_detections,
        class_agnostic=class_agnostic,
    ).eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand((1, 3, h, w), generator=gen) * 255).to(device)
    image_hw = torch.tensor([[h, w]], dtype=torch.float32, device=device)
    orig_hw = torch.tensor([[2 * h, 2 * w]], dtype=torch.float32, device=device)
    example_inputs: tuple[Tensor, ...] = (images, image_hw, orig_hw)
    input_names = list(INPUT_NAMES)
    output_names = list(NMS_OUTPUT_NAMES if with_nms else DENSE_OUTPUT_NAMES)
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if raw_input:
        graph = _RawInputGraph(graph, cfg.test_image_short_size, cfg.test_image_max_size).eval()
        example_inputs = ((torch.rand((h, w, 3), generator=gen) * 255).to(device=device, dtype=torch.uint8),)
        input_names = [RAW_INPUT_NAME]
        if dynamic:
            dynamic_axes = {RAW_INPUT_NAME: {0: "height", 1: "width"}}
            if not with_nms:
                dynamic_axes |= {"scores": {1: "anchors"}, "boxes": {1: "anchors"}}
    elif dynamic:
        dynamic_axes = {
            "images": {0: "batch", 2: "height", 3: "width"},
            "image_hw": {0: "batch"},
            "orig_hw": {0: "batch"},
        }
        if with_nms:
            dynamic_axes |= {"detections": {0: "batch"}, "num_detections": {0: "batch"}}
        else:
            dynamic_axes |= {"scores": {0: "batch", 1: "anchors"}, "boxes": {0: "batch", 1: "anchors"}}

    path = Path(path)
    with atomic_path(path) as tmp_path:
        tmp = str(tmp_path)
        with torch.no_grad(), warnings.catch_warnings():
            # Expected while tracing: the pad branch is fixed on purpose (see _ExportGraph.forward)
            # and every index tensor is non-negative.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*advanced indexing.*")
            warnings.filterwarnings("ignore", message=".*torch.jit.script. is deprecated.*")
            # dynamo=False on purpose: the torch.export exporter needs onnxscript (an extra dependency).
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*The feature will be removed.*")
            torch.onnx.export(
                graph,
                example_inputs,
                tmp,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(tmp)
        meta = export_metadata(
            cfg,
            with_nms=with_nms,
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            max_detections=max_detections,
            class_agnostic=class_agnostic,
            model_name=model_name,
            raw_input=raw_input,
        )
        onnx.helper.set_model_props(proto, meta)
        if raw_input:
            # One image in, so the batch axis of every output is 1 (the exporter leaves it symbolic).
            for output in proto.graph.output:
                batch_dim = output.type.tensor_type.shape.dim[0]
                batch_dim.Clear()
                batch_dim.dim_value = 1
        if not with_nms:
            # The exporter leaves the class axis symbolic; it is fixed by the model.
            class_dim = proto.graph.output[0].type.tensor_type.shape.dim[2]
            class_dim.Clear()
            class_dim.dim_value = cfg.num_classes
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
    return path

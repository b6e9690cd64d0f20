"""The export graph is the model's own forward: traced once, it follows the input size (no onnx needed).

``torch.jit.trace`` of :class:`ExportGraph` at one size, run at other sizes and batch sizes, equals
``dense_scores_and_boxes(model(images))``; the traceable NMS (:func:`select_in_graph`, run eagerly)
gives exactly :func:`select_detections`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from atssdet.compat import DetEvaluator
from atssdet.data.transforms import images_to_batch
from atssdet.export_graph import ExportGraph, select_in_graph
from atssdet.options import InferenceOptions
from atssdet.postprocess import dense_scores_and_boxes, select_detections


def _inputs(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, h, w), generator=gen) * 255
    image_hw = torch.tensor([[h, w]] * n, dtype=torch.float32)
    return images, image_hw, image_hw * 1.5


@pytest.mark.slow  # tracing the res18 graph takes ~12 s on 2 cores
def test_traced_export_graph_follows_the_input_size(r18_model):
    graph = ExportGraph(r18_model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(graph, _inputs(1, 213, 160, seed=0), check_trace=False)
    # 213x160 pads to 224x160: 751 points; 229x160 pads to 256x160 (856), 320x480 needs no pad (3202).
    for n, h, w, points in [(2, 229, 160, 856), (1, 320, 480, 3202)]:
        images, image_hw, orig_hw = _inputs(n, h, w, seed=h)
        with torch.no_grad():
            scores, boxes = traced(images, image_hw, orig_hw)
            want_scores, want_boxes = dense_scores_and_boxes(r18_model(images), image_hw, orig_hw)
        assert want_scores.shape == (n, points, 80)
        assert scores.shape == (n, points, 80) and boxes.shape == (n, points, 4)
        # Eager PyTorch runs NHWC on the CPU, the trace NCHW: equal up to float32 summation order.
        torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(boxes, want_boxes, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        InferenceOptions(score_threshold=0.22, max_detections=64),  # 79 and 58 survive NMS
        InferenceOptions(score_threshold=0.13, max_detections=75, class_agnostic=True),  # 69 and 81
        InferenceOptions(score_threshold=0.3),  # 14 and 11
    ],
    ids=["per-class", "class-agnostic", "few"],
)
def test_select_in_graph_equals_select_detections(r18_model, r18_outputs, options):
    """Both orderings (class-major up to K survivors, else the K best by score), exactly."""
    resized, infos = [], []
    for name in ("cat", "synth_1000x700"):
        data, info = DetEvaluator.process_inputs(r18_outputs[f"{name}__image"], 160, 256)
        resized.append(data[0].transpose(1, 2, 0).astype(np.uint8))
        infos.append(info[0])
    hw = torch.from_numpy(np.stack(infos))
    with torch.no_grad():
        scores, boxes = dense_scores_and_boxes(r18_model(images_to_batch(resized)), hw[:, :2], hw[:, 2:4])
    detections, counts = select_in_graph(scores, boxes, options)
    want = select_detections(
        scores,
        boxes,
        score_threshold=options.score_threshold,
        nms_threshold=options.nms_threshold,
        max_detections=options.max_detections,
        class_agnostic=options.class_agnostic,
    )
    assert detections.shape == (2, options.max_detections, 6)
    for rows, k, w in zip(detections, counts.tolist(), want, strict=True):
        assert k == len(w) > 0
        assert torch.equal(rows[:k], w.to_array().float())
        assert not rows[k:].any()

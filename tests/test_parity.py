"""Parity with MegEngine's own outputs on the reference res18 checkpoint (README sections 2-3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atssdet.compat import CompatModel, DetEvaluator
from tests.helpers import assert_dets_match

IMAGES = ("cat", "synth_600x900", "synth_1000x700")
SCORE_TOL = 1e-4
BOX_TOL = 0.02


def test_process_inputs_exact(r18_outputs):
    for name in IMAGES:
        data, im_info = DetEvaluator.process_inputs(r18_outputs[f"{name}__image"], 800, 1333)
        assert data.dtype == np.float32 and im_info.dtype == np.float32
        np.testing.assert_array_equal(data, r18_outputs[f"{name}__data"])
        np.testing.assert_array_equal(im_info, r18_outputs[f"{name}__im_info"])
    data, im_info = DetEvaluator.process_inputs(r18_outputs["cat__image"], 160, 256)
    np.testing.assert_array_equal(data, r18_outputs["small__data"])
    np.testing.assert_array_equal(im_info, r18_outputs["small__im_info"])


def test_process_inputs_flip(r18_outputs):
    data, _ = DetEvaluator.process_inputs(r18_outputs["cat__image"], 160, 256, flip=True)
    np.testing.assert_array_equal(data, r18_outputs["small__data"][..., ::-1])


@torch.no_grad()
def test_intermediate_features_small_input(r18_model, r18_outputs):
    data = torch.from_numpy(r18_outputs["small__data"])
    x = r18_model.normalize(data)
    np.testing.assert_allclose(x.numpy(), r18_outputs["small__normalized_input"], rtol=0, atol=1e-6)
    feats = r18_model.backbone.bottom_up(x)
    for key in ("stem", "res2", "res3", "res4", "res5"):
        ref = r18_outputs[f"small__{key}"]
        assert feats[key].shape == ref.shape
        np.testing.assert_allclose(feats[key].numpy(), ref, rtol=0, atol=1e-4, err_msg=key)
    pyramid = r18_model.backbone(x)
    for level, p in zip((3, 4, 5, 6, 7), pyramid, strict=True):
        ref = r18_outputs[f"small__p{level}"]
        assert p.shape == ref.shape
        np.testing.assert_allclose(p.numpy(), ref, rtol=0, atol=1e-4, err_msg=f"p{level}")
    logits, offsets, ctrness = r18_model.head(pyramid)
    for i, level in enumerate((3, 4, 5, 6, 7)):
        np.testing.assert_allclose(logits[i].numpy(), r18_outputs[f"small__logits_p{level}"], atol=1e-4)
        np.testing.assert_allclose(offsets[i].numpy(), r18_outputs[f"small__offsets_p{level}"], atol=2e-3)
        np.testing.assert_allclose(ctrness[i].numpy(), r18_outputs[f"small__ctrness_p{level}"], atol=1e-4)
    out = r18_model(data)
    anchors = np.concatenate([r18_outputs[f"small__anchors_p{level}"] for level in (3, 4, 5, 6, 7)])
    np.testing.assert_array_equal(out.points.numpy(), anchors)


@torch.no_grad()
def test_raw_outputs_small_and_full(r18_model, r18_outputs):
    model = CompatModel(r18_model).eval()
    scores, boxes = model(image=r18_outputs["small__data"], im_info=r18_outputs["small__im_info"])
    assert np.abs(scores.numpy() - r18_outputs["small__scores"]).max() <= SCORE_TOL
    assert np.abs(boxes.numpy() - r18_outputs["small__boxes"]).max() <= BOX_TOL
    scores, boxes = model(image=r18_outputs["cat__data"], im_info=r18_outputs["cat__im_info"])
    assert scores.shape == r18_outputs["cat__scores"].shape == (18134, 80)
    assert np.abs(scores.numpy() - r18_outputs["cat__scores"]).max() <= SCORE_TOL
    assert np.abs(boxes.numpy() - r18_outputs["cat__boxes"]).max() <= BOX_TOL


def test_final_detections_small(r18_model, r18_outputs):
    dets = DetEvaluator(r18_model).predict(
        image=r18_outputs["small__data"], im_info=r18_outputs["small__im_info"]
    )
    assert isinstance(dets, np.ndarray) and dets.dtype == np.float64
    assert_dets_match(dets, r18_outputs["small__dets"])


@pytest.mark.parametrize("name", IMAGES)
def test_final_detections_full_size(r18_model, r18_outputs, name):
    dets = DetEvaluator(r18_model).predict(
        image=r18_outputs[f"{name}__data"], im_info=r18_outputs[f"{name}__im_info"]
    )
    assert_dets_match(dets, r18_outputs[f"{name}__dets"])


@torch.no_grad()
def test_megengine_numerics_raw_outputs(r18_model, r18_model_mge, r18_outputs):
    """numerics="megengine": raw scores ~10x closer to MegEngine's than PyTorch's GroupNorm gives on cat.

    Measured max |score error|: small 5.8e-7 / 7.7e-7 on two runs here and 1.55e-6 on another machine
    of the same kind (kernel and thread-count rounding), cat 1.2e-6 to 1.4e-6; default numerics on cat
    1.39e-5. So: absolute 5e-6 (3x the worst seen), and on cat a ratio of at least 4 (measured 12).
    """
    errors = {}
    for numerics, net in (("torch", r18_model), ("megengine", r18_model_mge)):
        model = CompatModel(net).eval()
        for name in ("small", "cat"):
            with torch.no_grad():
                scores, boxes = model(
                    image=r18_outputs[f"{name}__data"], im_info=r18_outputs[f"{name}__im_info"]
                )
            errors[numerics, name] = float(np.abs(scores.numpy() - r18_outputs[f"{name}__scores"]).max())
            assert np.abs(boxes.numpy() - r18_outputs[f"{name}__boxes"]).max() <= 1e-3, name
    assert errors["megengine", "small"] <= 5e-6 and errors["megengine", "cat"] <= 5e-6, errors
    assert errors["torch", "cat"] >= 4 * errors["megengine", "cat"], errors


@pytest.mark.parametrize("name", ("small", *IMAGES))
def test_megengine_numerics_detections_in_order(r18_model_mge, r18_outputs, name):
    """numerics="megengine": MegEngine's detections row by row (no tie allowance), scores within 5e-6."""
    dets = DetEvaluator(r18_model_mge).predict(
        image=r18_outputs[f"{name}__data"], im_info=r18_outputs[f"{name}__im_info"]
    )
    ref = r18_outputs[f"{name}__dets"]
    assert dets.shape == ref.shape
    np.testing.assert_array_equal(dets[:, 5], ref[:, 5])
    assert np.abs(dets[:, :4] - ref[:, :4]).max() <= 1e-3  # measured 1.8e-4 px
    assert np.abs(dets[:, 4] - ref[:, 4]).max() <= 5e-6  # measured 1.5e-6 (raw scores: up to 1.55e-6)


def test_postprocess_reproduces_megengine_from_reference_raw_outputs(r18_outputs):
    """On MegEngine's own raw outputs our post-processing gives its detections bit for bit."""
    from atssdet.postprocess import select_detections

    scores = torch.from_numpy(r18_outputs["cat__scores"])[None]
    boxes = torch.from_numpy(r18_outputs["cat__boxes"])[None]
    for cap, key in ((100, "cat__dets"), (1000, "cat__dets_top1000")):
        (dets,) = select_detections(scores, boxes, max_detections=cap)
        np.testing.assert_array_equal(dets.to_array().numpy(), r18_outputs[key])


def test_assert_dets_match_can_fail(r18_outputs):
    ref = r18_outputs["small__dets"]
    swapped = ref.copy()
    swapped[[0, 50]] = swapped[[50, 0]]
    with pytest.raises(AssertionError):
        assert_dets_match(swapped, ref)
    shifted = ref.copy()
    shifted[3, 0] += 0.05
    with pytest.raises(AssertionError):
        assert_dets_match(shifted, ref)

"""The seed's API: batches give exactly the per-image results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atssdet.compat import CompatModel, DetEvaluator
from tests.helpers import assert_dets_match


def _batch(items):
    """Pad (data, im_info) pairs into one zero-padded batch, as MegEngine's loader does."""
    h = max(d.shape[2] for d, _ in items)
    w = max(d.shape[3] for d, _ in items)
    data = np.zeros((len(items), 3, h, w), np.float32)
    for i, (d, _) in enumerate(items):
        data[i, :, : d.shape[2], : d.shape[3]] = d[0]
    return data, np.concatenate([info for _, info in items])


def test_batch_predict_equals_one_at_a_time(r18_model, r18_outputs):
    evaluator = DetEvaluator(r18_model)
    items = [
        DetEvaluator.process_inputs(r18_outputs[f"{name}__image"], 224, 320)
        for name in ("cat", "synth_600x900", "synth_1000x700", "cat")
    ]
    items[3] = DetEvaluator.process_inputs(r18_outputs["cat__image"], 224, 320, flip=True)
    singles = [evaluator.predict(image=d, im_info=i) for d, i in items]
    batched = evaluator.predict(*_batch(items))
    assert isinstance(batched, list) and len(batched) == 4
    for one, many in zip(singles, batched, strict=True):
        assert one.shape[0] > 0
        # Same-size images share a forward pass; CPU kernels for batch 2 vs 1 differ in float32 rounding.
        assert_dets_match(many, one, score_tol=1e-5, box_tol=1e-3)


@torch.no_grad()
def test_compat_forward_concatenates_images(r18_model, r18_outputs):
    model = CompatModel(r18_model).eval()
    a = DetEvaluator.process_inputs(r18_outputs["cat__image"], 160, 256)
    b = DetEvaluator.process_inputs(r18_outputs["synth_600x900__image"], 160, 256)
    sa, ba = model(image=a[0], im_info=a[1])
    sb, bb = model(image=b[0], im_info=b[1])
    s, bx = model(*_batch([a, b]))
    # Different padded sizes run as separate passes, so the batch result is bit-identical.
    np.testing.assert_array_equal(s.numpy(), np.concatenate([sa.numpy(), sb.numpy()]))
    np.testing.assert_array_equal(bx.numpy(), np.concatenate([ba.numpy(), bb.numpy()]))


def test_compat_rejects_bad_shapes(r18_model):
    model = CompatModel(r18_model).eval()
    with pytest.raises(ValueError, match="im_info"):
        model(image=np.zeros((1, 3, 64, 64), np.float32), im_info=np.zeros((2, 4), np.float32))


def test_training_mode_requires_gt_boxes(r18_model):
    model = CompatModel(r18_model)
    model.train()
    try:
        with pytest.raises(ValueError, match="gt_boxes"):
            model(image=np.zeros((1, 3, 64, 64), np.float32), im_info=np.zeros((1, 5), np.float32))
    finally:
        model.eval()

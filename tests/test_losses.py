"""Loss terms: hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import torch

from atssdet.ops.losses import bce_with_logits_sum, centerness_target, giou_loss_ltrb, sigmoid_focal_loss_sum


def test_focal_loss_hand_values() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p2 = 1 / (1 + math.exp(-2.0))
    p3 = 1 / (1 + math.exp(1.0))
    expected = (
        0.25 * 0.25 * math.log(2)  # positive, p = 0.5
        + 0.75 * 0.25 * math.log(2)  # negative, p = 0.5
        + 0.75 * p2**2 * -math.log(1 - p2)
        + 0.25 * (1 - p3) ** 2 * -math.log(p3)
    )
    assert math.isclose(float(sigmoid_focal_loss_sum(logits, targets)), expected, rel_tol=1e-6)


def test_giou_loss_hand_values() -> None:
    points = torch.tensor([[5.0, 5.0], [0.0, 0.0], [10.0, 10.0]])
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    loss = giou_loss_ltrb(pred, target, points)
    # identical -> 0; disjoint [0,0,1,1] vs [2,0,3,1]: IoU 0, enclosing 3, union 2 -> 1 + 1/3;
    # empty prediction at the centre of a 2x2 box: IoU 0, enclosing 4 = union -> 1.
    torch.testing.assert_close(loss, torch.tensor([0.0, 4.0 / 3.0, 1.0]))


def test_giou_loss_degenerate_is_finite_and_has_gradient() -> None:
    pred = torch.zeros(1, 4, requires_grad=True)
    loss = giou_loss_ltrb(pred, torch.zeros(1, 4), torch.zeros(1, 2))
    loss.sum().backward()
    assert float(loss.detach()) == 1.0  # union and enclosing area clamped at 1e-8: 1 - (0 - 0)
    assert pred.grad is not None and bool(torch.isfinite(pred.grad).all())


def test_centerness_target_hand_values() -> None:
    ltrb = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], [-1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(centerness_target(ltrb), torch.tensor([1.0, math.sqrt(1 / 6), 0.0, 0.0]))


def test_centerness_target_is_correctly_rounded_float32() -> None:
    ltrb = torch.rand(5000, 4, generator=torch.Generator().manual_seed(0)) * 100
    a = ltrb.numpy()
    lr = a[:, 0::2].min(1) / a[:, 0::2].max(1)
    tb = a[:, 1::2].min(1) / a[:, 1::2].max(1)
    np.testing.assert_array_equal(centerness_target(ltrb).numpy(), np.sqrt(lr * tb))


def test_bce_with_logits_sum() -> None:
    value = bce_with_logits_sum(torch.tensor([0.0, 3.0]), torch.tensor([0.5, 1.0]))
    assert math.isclose(float(value), math.log(2) + math.log(1 + math.exp(-3.0)), rel_tol=1e-6)

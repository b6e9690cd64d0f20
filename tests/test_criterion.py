"""ATSS losses: MegEngine train-step parity (losses and gradients), normalisers, edge cases.

Relative error of an array = max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atssdet import criterion
from atssdet.assign import atss_assign
from atssdet.compat import CompatModel, seed_training_losses
from atssdet.config import ATSSConfig
from atssdet.criterion import atss_loss
from atssdet.loader import load
from atssdet.modeling.atss import ATSSOutput
from atssdet.ops.points import grid_points
from tests.conftest import R18

STRIDES = (8, 16, 32, 64, 128)


@pytest.fixture(scope="module", autouse=True)
def _two_torch_threads():
    """The train-step gradients are compared at float32 ties (a ReLU pre-activation of -3e-7, below):
    their rounding depends on the convolutions' thread split, so this module runs with this machine
    kind's default of 2 threads whatever an earlier module left set (test_train pins 1). Measured with
    1 thread: fpn_output5 2.3e-4 even with MegEngine's gate set, other ties deciding otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _rel(ours: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(np.asarray(ref, dtype=np.float32)).reshape(ours.shape)
    return float((ours.detach().float() - ref_t).abs().max() / ref_t.abs().max())


def _run_train_step(ref: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    compat = CompatModel(model).train()
    losses = compat(image=torch.from_numpy(ref["data"]), im_info=ref["im_info"], gt_boxes=ref["gt_boxes"])
    losses["total_loss"].backward()
    return losses


@pytest.fixture(scope="module")
def train_step(reference_dir, r18_model):
    """One forward + backward of the reference batch, default (PyTorch) numerics, done once."""
    ref = dict(np.load(reference_dir / f"{R18}.seed0.train_step.npz"))
    model = copy.deepcopy(r18_model)  # the session model stays untouched (eval mode, no grads)
    return ref, model, _run_train_step(ref, model)


def _megengine_numerics_model(checkpoint) -> torch.nn.Module:
    return load(R18, weights=checkpoint, overrides={"numerics": "megengine"})


@pytest.fixture(scope="module")
def train_step_mge(reference_dir, r18_checkpoint):
    """The same step with ``numerics="megengine"`` (head GroupNorm rounded as MegEngine's CPU kernel)."""
    ref = dict(np.load(reference_dir / f"{R18}.seed0.train_step.npz"))
    model = _megengine_numerics_model(r18_checkpoint)
    return ref, model, _run_train_step(ref, model)


def _check_losses(ref: dict, losses: dict[str, torch.Tensor], tolerances: dict[str, float]) -> None:
    assert set(losses) == {"total_loss", "loss_cls", "loss_bbox", "loss_ctr"}
    for key, tol in tolerances.items():
        assert _rel(losses[key], ref[f"{key}_nearest"]) < tol, key


def _check_gradients(ref: dict, model: torch.nn.Module, tolerances: dict[str, float]) -> None:
    params = dict(model.named_parameters())
    assert set(ref["grad_keys"].tolist()) == set(tolerances)
    for key, tol in tolerances.items():
        grad = params[key].grad
        assert grad is not None, key
        assert _rel(grad, ref[f"grad__{key}_nearest"]) < tol, key
    assert float(params["head.scale_list"].grad[4]) == 0.0  # no positive on p7
    assert model.backbone.bottom_up.conv1.weight.grad is None  # conv1 + layer1 stay frozen in train mode


def test_train_step_losses(train_step_mge) -> None:
    ref, _, losses = train_step_mge
    # measured: total 1.8e-7, cls 1.8e-7, bbox 7.3e-8, ctr 7.1e-8
    _check_losses(ref, losses, dict.fromkeys(["total_loss", "loss_cls", "loss_bbox", "loss_ctr"], 1e-5))


def test_train_step_losses_default_numerics(train_step) -> None:
    ref, _, losses = train_step
    # bbox 7e-8 and ctr 3e-7 measured. cls (and so total) measured 1.31e-5: MegEngine's GroupNorm sums
    # ~10^5 values per group sequentially in float32, which offsets its p3 scores by ~5e-6 relative; the
    # focal sum over all 3M point x class terms integrates that. numerics="megengine" removes it (above).
    # Bounds 3x+ above the measured values (float rounding differs between machines and thread counts).
    _check_losses(ref, losses, {"loss_bbox": 1e-5, "loss_ctr": 1e-5, "loss_cls": 5e-5, "total_loss": 5e-5})


def test_megengine_numerics_brings_loss_cls_closer(train_step, train_step_mge) -> None:
    """The cls loss error is a GroupNorm-rounding effect: numerics="megengine" is >= 10x closer (measured 73x)."""
    ref, _, default = train_step
    _, _, mge = train_step_mge
    ratio = _rel(default["loss_cls"], ref["loss_cls_nearest"]) / _rel(
        mge["loss_cls"], ref["loss_cls_nearest"]
    )
    assert ratio >= 10, ratio


HEAD_GRADIENTS = ("head.cls_score.weight", "head.bbox_pred.weight", "head.ctrness.weight", "head.scale_list")


def test_train_step_gradients(train_step_mge) -> None:
    ref, model, _ = train_step_mge
    # head: measured 5.2e-6, 5.3e-7, 3.7e-7, 9.1e-8. fpn_output5: measured 1.34e-4, all of it from one
    # ReLU decision on a pre-activation of -3e-7 (next test), which another machine's rounding may decide
    # the other way; bound 3.7x the measured gap.
    _check_gradients(ref, model, {**dict.fromkeys(HEAD_GRADIENTS, 1e-4), "backbone.fpn_output5.weight": 5e-4})


# Found by solving grad(fpn_output5.weight) error = conv-weight-gradient(prev5, d) for the error d in
# dL/dP5 (least squares, 2304 equations x 1750 unknowns): d is confined to the 3x3 footprint of one P5
# position, (image 1, y 23, x 3), i.e. one gate of the first cls-tower ReLU at P5. There, channel 35's
# pre-activation is -3e-7 in our float32 (and float64) forward; MegEngine's conv rounding, which differs
# from the exact result by up to ~1e-5 on P6, made it positive.
TIE = (1, 35, 23, 3)  # image, channel, y, x of cls_subnet ReLU 0 input at level p5


class _ReLUWithGate(torch.nn.Module):
    """ReLU that reports its P5 input at TIE and there takes MegEngine's branch (open; level index 2).

    The gate is set, not flipped: float32 rounding puts this pre-activation on either side of zero
    depending on the machine's convolution kernels, and MegEngine's run had it positive.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.value = 0, float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = (x > 0).to(x.dtype)
        if self.calls == 2:
            self.value = float(x[TIE].detach())
            gate[TIE] = 1.0
        self.calls += 1
        return x * gate


def test_fpn_output5_gradient_gap_is_one_relu_tie(reference_dir, r18_checkpoint) -> None:
    ref = dict(np.load(reference_dir / f"{R18}.seed0.train_step.npz"))
    model = _megengine_numerics_model(r18_checkpoint)
    relu = _ReLUWithGate()
    model.head.cls_subnet[2] = relu
    _run_train_step(ref, model)
    assert abs(relu.value) < 1e-6  # a tie at float32 resolution, decided by kernel rounding
    # With that one gate as MegEngine had it, every listed gradient matches (measured max 6.8e-6; bound
    # 3.7x that, still 4x under the 1e-4 parity target).
    _check_gradients(ref, model, dict.fromkeys([*HEAD_GRADIENTS, "backbone.fpn_output5.weight"], 2.5e-5))


def test_train_step_gradients_default_numerics(train_step) -> None:
    ref, model, _ = train_step
    tolerances = {
        "head.cls_score.weight": 1e-4,  # measured 2.0e-5
        "head.bbox_pred.weight": 1e-4,  # 1.1e-6
        "head.ctrness.weight": 1e-4,  # 1.0e-6
        "head.scale_list": 1e-4,  # 3.6e-7
        # measured 2.8e-4 (2.0e-4 with NCHW activations): the GroupNorm offset plus ReLU ties like the
        # one above, which the float32 rounding of the (NHWC, CPU) convolutions decides either way.
        "backbone.fpn_output5.weight": 1e-3,
    }
    _check_gradients(ref, model, tolerances)


def test_loss_function_alone_is_exact(train_step) -> None:
    """atss_loss on our head outputs == a float64 re-implementation fed the *reference* targets."""
    ref, model, losses = train_step
    with torch.no_grad():
        out = model(torch.from_numpy(ref["data"]))
    labels = torch.from_numpy(ref["gt_labels_nearest"]).long()
    fg = labels > 0
    onehot = F.one_hot(labels, 81)[..., 1:].double()
    logits = out.cls_logits.double()
    p = torch.sigmoid(logits)
    focal = -(
        onehot * 0.25 * (1 - p) ** 2 * F.logsigmoid(logits)
        + (1 - onehot) * 0.75 * p**2 * F.logsigmoid(-logits)
    )
    num_fg = float(fg.sum())
    ctr_t = torch.from_numpy(ref["gt_ctrness_nearest"]).double()[fg]
    t = torch.from_numpy(ref["gt_offsets_nearest"]).double()[fg]
    pr = out.box_ltrb.double()[fg]
    area = lambda b: (b[:, 0] + b[:, 2]) * (b[:, 1] + b[:, 3])  # noqa: E731
    inter = (torch.minimum(pr[:, 0], t[:, 0]) + torch.minimum(pr[:, 2], t[:, 2])).clamp(min=0) * (
        torch.minimum(pr[:, 1], t[:, 1]) + torch.minimum(pr[:, 3], t[:, 3])
    ).clamp(min=0)
    union = area(pr) + area(t) - inter
    enclose = (torch.maximum(pr[:, 0], t[:, 0]) + torch.maximum(pr[:, 2], t[:, 2])) * (
        torch.maximum(pr[:, 1], t[:, 1]) + torch.maximum(pr[:, 3], t[:, 3])
    )
    giou = inter / union - (enclose - union) / enclose
    expected = {
        "loss_cls": float(focal.sum()) / num_fg,
        "loss_bbox": float(((1 - giou) * ctr_t).sum() / ctr_t.sum() * 2.0),
        "loss_ctr": float(
            F.binary_cross_entropy_with_logits(out.ctr_logits.double()[fg], ctr_t, reduction="sum")
        )
        / num_fg,
    }
    for key, value in expected.items():
        assert math.isclose(float(losses[key].detach()), value, rel_tol=2e-6), key


def _synthetic_output(generator: torch.Generator, *, num_classes: int = 5) -> ATSSOutput:
    hw = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    points = torch.cat(grid_points(hw, STRIDES))
    a = points.shape[0]
    return ATSSOutput(
        cls_logits=torch.randn(2, a, num_classes, generator=generator) - 2,
        box_ltrb=torch.rand(2, a, 4, generator=generator) * 40,
        ctr_logits=torch.randn(2, a, generator=generator),
        points=points,
        num_points_per_level=tuple(h * w for h, w in hw),
    )


def _small_cfg() -> ATSSConfig:
    return ATSSConfig(num_classes=5, class_names=tuple("abcde"))


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[4.0, 6.0, 50.0, 40.0], [30.0, 20.0, 90.0, 60.0]]),
            "labels": torch.tensor([1, 4]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_atss_loss_normalisers_by_hand() -> None:
    out = _synthetic_output(torch.Generator().manual_seed(0))
    targets = _targets()
    losses = atss_loss(out, targets, _small_cfg())
    boxes = torch.stack([targets[0]["boxes"], torch.zeros(2, 4)])
    valid = torch.tensor([[True, True], [False, False]])
    assignment = atss_assign(out.points, out.num_points_per_level, STRIDES, boxes, valid)
    fg = assignment.matched_gt >= 0
    assert bool(fg[0].any()) and not bool(fg[1].any())
    num_fg = int(fg.sum())
    assert float(losses["num_fg"]) == num_fg
    onehot = torch.zeros_like(out.cls_logits)
    onehot[0, fg[0], targets[0]["labels"][assignment.matched_gt[0, fg[0]]]] = 1
    p = torch.sigmoid(out.cls_logits)
    ce = F.binary_cross_entropy_with_logits(out.cls_logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    focal = ((0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2).sum() / num_fg
    torch.testing.assert_close(losses["loss_cls"], focal)
    ctr_t = assignment.target_ctrness[fg]
    ctr = F.binary_cross_entropy_with_logits(out.ctr_logits[fg], ctr_t, reduction="sum") / num_fg
    torch.testing.assert_close(losses["loss_ctr"], ctr)
    torch.testing.assert_close(
        losses["total_loss"], losses["loss_cls"] + losses["loss_bbox"] + losses["loss_ctr"]
    )


def test_atss_loss_without_any_box_is_finite_and_backpropagates() -> None:
    out = _synthetic_output(torch.Generator().manual_seed(1))
    logits = out.cls_logits.requires_grad_()
    box_ltrb = out.box_ltrb.requires_grad_()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = atss_loss(out, [empty, empty], _small_cfg())
    assert float(losses["loss_bbox"].detach()) == 0.0 and float(losses["loss_ctr"].detach()) == 0.0
    assert float(losses["num_fg"]) == 0.0
    # focal divided by max(num_fg, 1) = 1: the plain sum
    expected = 0.75 * (torch.sigmoid(logits) ** 2 * F.softplus(logits)).sum()
    torch.testing.assert_close(losses["loss_cls"], expected)
    losses["total_loss"].backward()
    assert logits.grad is not None and box_ltrb.grad is not None


def test_atss_loss_under_autocast_is_float32() -> None:
    out = _synthetic_output(torch.Generator().manual_seed(2))
    half = out._replace(cls_logits=out.cls_logits.bfloat16(), box_ltrb=out.box_ltrb.bfloat16())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = atss_loss(half, _targets(), _small_cfg())
    assert all(v.dtype == torch.float32 for v in losses.values())
    reference = atss_loss(
        out._replace(cls_logits=half.cls_logits.float(), box_ltrb=half.box_ltrb.float()),
        _targets(),
        _small_cfg(),
    )
    for key in ("loss_cls", "loss_bbox", "loss_ctr"):
        torch.testing.assert_close(losses[key], reference[key])


def test_normalisers_are_averaged_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _synthetic_output(torch.Generator().manual_seed(3))
    single = atss_loss(out, _targets(), _small_cfg())

    def fake_all_reduce(tensor: torch.Tensor) -> None:
        tensor.mul_(4)  # as if the other rank had 3x this rank's num_fg and sum_ctr

    monkeypatch.setattr(criterion.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion.dist, "all_reduce", fake_all_reduce)
    multi = atss_loss(out, _targets(), _small_cfg())
    assert float(multi["num_fg"]) == 2 * float(single["num_fg"])
    for key in ("loss_cls", "loss_bbox", "loss_ctr"):
        torch.testing.assert_close(multi[key], single[key] / 2)


def test_bad_targets_raise_named_errors() -> None:
    out = _synthetic_output(torch.Generator().manual_seed(4))
    cfg = _small_cfg()
    good = _targets()[0]
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must lie in 0..4"):
        atss_loss(out, [good, {"boxes": torch.zeros(1, 4), "labels": torch.tensor([5])}], cfg)
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must be \[M, 4\]"):
        atss_loss(out, [{"boxes": torch.zeros(4), "labels": torch.tensor([0])}, good], cfg)
    with pytest.raises(ValueError, match="2 images"):
        atss_loss(out, [good], cfg)


def test_seed_training_losses_validates_shapes(r18_model) -> None:
    with pytest.raises(ValueError, match="gt_boxes must be"):
        seed_training_losses(
            r18_model, torch.zeros(1, 3, 32, 32), torch.tensor([[32, 32, 32, 32, 1]]), torch.zeros(1, 4)
        )
    with pytest.raises(ValueError, match=r"im_info\[0, 4\]"):
        seed_training_losses(
            r18_model, torch.zeros(1, 3, 32, 32), torch.tensor([[32, 32, 32, 32, 3]]), torch.zeros(1, 2, 5)
        )

"""The device path under a device guard, on a CPU-only machine (issue 18, item 1).

:mod:`tests.device_guard` simulates an accelerator: :data:`~tests.device_guard.DEVICE` is
``torch.device("meta")``, whose tensors here hold real CPU data, so the whole pipeline computes real
values while every op is checked. The choice, in short: ``meta`` is the one non-CPU device that every
PyTorch build has and that autograd accepts, library code reading ``x.device`` sees "not the CPU"
(as on a GPU), and tensors created without ``device=`` land on the host exactly as on a GPU machine.
So a tensor created on the wrong device raises :class:`~tests.device_guard.DeviceMixError` where it
meets device tensors, and a read of device values on the host (``.item()``, ``bool()``, ``.tolist()``,
``.cpu()``, ...) raises :class:`~tests.device_guard.HostSyncError` unless it is one of the documented
syncs in :data:`~tests.device_guard.ALLOWED_SYNCS`. The tests below run the model forward,
``atss_assign``/``atss_loss``, ``select_detections``, ``Detector.predict``, evaluation's model step and
one training step under it, compare the values with the plain CPU run, and count the syncs; two
planted faults (a CPU tensor inside the forward pass, a host read inside the assignment) show that
the guard fails when it should.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import atssdet.assign as assign_mod
import atssdet.modeling.atss as atss_mod
import atssdet.validate as validate_mod
from atssdet.config import PRESETS, with_overrides
from atssdet.criterion import LOSS_KEYS, atss_loss
from atssdet.data.collate import collate_detection
from atssdet.detector import Detector
from atssdet.modeling.atss import ATSS, build_model
from atssdet.postprocess import dense_scores_and_boxes, select_detections
from atssdet.training.checkpoint import TrainingState
from atssdet.training.device import DeviceOptions, device_options
from atssdet.training.step import train_step
from tests.conftest import R18
from tests.device_guard import DEVICE, DeviceGuard, DeviceMixError, DeviceTensor, HostSyncError, host


@pytest.fixture(autouse=True)
def _accept_the_simulated_device(monkeypatch):
    """atssdet's value check refuses ``meta`` as a user's --device; here it stands for the accelerator."""
    real = validate_mod.device
    monkeypatch.setattr(validate_mod, "device", lambda value: value if value == DEVICE else real(value))


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A tiny res18 ATSS (thin FPN and head, GN backbone trained from scratch) on 64 x 96 images.
TINY = with_overrides(
    PRESETS[R18],
    {
        "fpn_out_channels": 32, "fpn_top_in_channel": 32, "head_num_convs": 1, "head_norm_groups": 8,
        "backbone_norm": "GN", "backbone_freeze_at": 0, "test_image_short_size": 64,
        "test_image_max_size": 96, "test_cls_threshold": 0.0,
    },
)  # fmt: skip


def tiny_model(seed: int = 0) -> ATSS:
    torch.manual_seed(seed)
    model = build_model(TINY)
    # Confident classifier on a few classes, so that detections survive the thresholds.
    with torch.no_grad():
        model.head.cls_score.bias[:3] = 2.0
    return model


def images(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8) for _ in range(n)]


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 8.0, 90.0, 60.0]]),
            "labels": torch.tensor([1, 5]),
        },
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 44.0]]), "labels": torch.tensor([2])},
    ]


def batch_tensor() -> torch.Tensor:
    return torch.from_numpy(np.stack(images()).transpose(0, 3, 1, 2).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# The guard itself


def test_guard_catches_each_kind_of_host_read_and_device_mix():
    with DeviceGuard(allow={}) as guard:
        x = torch.arange(6.0, device=DEVICE).reshape(2, 3)
        assert isinstance(x, DeviceTensor) and x.device == DEVICE
        y = (x * 2 + torch.tensor(1.0)).sum(0)  # a 0-dim host tensor is a scalar argument, as on CUDA
        for read in (lambda: y.sum().item(), lambda: bool(y.any()), lambda: float(y[0]), lambda: int(y[0]),
                     lambda: y.tolist(), lambda: y.cpu(), lambda: y.to("cpu"), lambda: torch.zeros(3).copy_(y),
                     lambda: y.numpy()):  # fmt: skip
            with pytest.raises(HostSyncError, match="outside atssdet|numpy"):
                read()
        with pytest.raises(
            DeviceMixError, match=r"mixes device tensors with host tensor\(s\) of shape \(3,\)"
        ):
            _ = y + torch.ones(3)
        x.nonzero()
        assert guard.implicit_ops == ["nonzero@<outside atssdet>"] and guard.syncs == []
    np.testing.assert_array_equal(host(y).numpy(), [8.0, 12.0, 16.0])


# --------------------------------------------------------------------------------------------------
# The device path, stage by stage


def test_forward_pass_reads_nothing_on_the_host():
    model = tiny_model().eval()
    data = batch_tensor()
    with torch.no_grad():
        expected = model(data)
        with DeviceGuard() as guard:
            output = model.to(DEVICE)(data.to(DEVICE))
    assert guard.syncs == [] and guard.implicit_syncs == []
    assert all(
        t.device == DEVICE for t in (output.cls_logits, output.box_ltrb, output.ctr_logits, output.points)
    )
    for got, want in zip(host(output[:4]), expected[:4], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # NCHW here vs NHWC on the CPU


def test_assignment_and_losses_sync_only_on_the_foreground_nonzero():
    model = tiny_model().train()
    data = batch_tensor()
    expected = {k: v.item() for k, v in atss_loss(model(data), targets(), TINY).items()}
    with DeviceGuard() as guard:
        losses = atss_loss(model.to(DEVICE)(data.to(DEVICE)), targets(), TINY)  # CPU targets: the loader's
        total = losses["total_loss"]
        total.backward()
    # nonzero: the foreground's size is data-dependent (also a sync on a GPU), taken once per step.
    assert guard.syncs == [] and guard.implicit_ops == ["nonzero@criterion.py:atss_loss"]
    assert total.device == DEVICE and model.head.cls_score.weight.grad.device == DEVICE
    got = {k: float(host(v)) for k, v in losses.items()}
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected["num_fg"] > 0

    with DeviceGuard() as guard:  # targets already on the device: one read validates them all
        on_device = [{k: v.to(DEVICE) for k, v in t.items()} for t in targets()]
        atss_loss(model(data.to(DEVICE)), on_device, TINY)
    assert guard.sync_sites == ["criterion.py:_check_target_values"]


def test_assign_on_grid_ties_matches_the_cpu_without_host_reads():
    """Points on a grid around a box centre: many distances tie at the k-th place. The device path computes
    the tie rule for every row without a read; it must pick what the CPU path (redo tied rows) picks."""
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    points = torch.stack((xs.reshape(-1), ys.reshape(-1)), 1) * 8 + 4
    gt = torch.tensor([[[12.0, 12.0, 36.0, 36.0], [0.0, 0.0, 64.0, 64.0]]])
    valid = torch.tensor([[True, True]])
    expected = assign_mod.atss_assign(points, [64], [8], gt, valid)
    with DeviceGuard() as guard:
        got = assign_mod.atss_assign(points.to(DEVICE), [64], [8], gt.to(DEVICE), valid.to(DEVICE))
    assert guard.syncs == [] and guard.implicit_syncs == []
    for a, b in zip(host(tuple(got)), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_post_processing_on_the_device():
    model = tiny_model().eval()
    data = batch_tensor()
    hw = torch.tensor([[64, 96], [64, 96]])
    with torch.no_grad():
        expected = select_detections(*dense_scores_and_boxes(model(data), hw, hw))
        with DeviceGuard() as guard:
            scores, boxes = dense_scores_and_boxes(model.to(DEVICE)(data.to(DEVICE)), hw, hw)
            dets = select_detections(scores, boxes, classes=torch.tensor([0, 1, 2]))
    assert guard.syncs == []
    # per image: the candidates' nonzero and the NMS (both sizes are data-dependent)
    assert (
        guard.implicit_ops
        == ["nonzero@postprocess.py:select_detections", "torchvision.nms@postprocess.py:select_detections"]
        * 2
    )
    for got, want in zip(dets, expected, strict=True):
        assert len(want) > 0 and got.boxes.device == DEVICE
        torch.testing.assert_close(host(got.scores), want.scores, rtol=1e-4, atol=1e-4)


def test_detector_predict_and_the_evaluation_model_step():
    # pycocotools: not on the GPU machine, whose tests import this module
    from atssdet.evaluation.loop import ModelRunner

    inputs = images()
    expected = Detector(tiny_model(), device="cpu").predict(inputs, batch_size=2)
    with DeviceGuard() as guard:
        dets = Detector(tiny_model(), device=DEVICE).predict(inputs, batch_size=2)
    # the only host reads: handing each image's detections back as CPU tensors
    assert set(guard.sync_sites) == {"runtime/torch_runner.py:TorchRunner.detect"}
    for got, want in zip(dets, expected, strict=True):
        assert len(want) > 0 and got.boxes.device.type == "cpu"
        torch.testing.assert_close(got.boxes, want.boxes, rtol=1e-3, atol=1e-2)
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-4)

    with DeviceGuard() as guard:
        runner = ModelRunner(tiny_model(), device=DEVICE)
        evaluated = runner.run([runner.preprocess(im) for im in inputs], [im.shape[:2] for im in inputs])
    assert set(guard.sync_sites) == {"runtime/torch_runner.py:TorchRunner.detect"}
    torch.testing.assert_close(evaluated[0].scores, expected[0].scores, rtol=1e-4, atol=1e-4)


def _train_once(model: ATSS, opts: DeviceOptions) -> dict[str, float]:
    samples: list[Any] = [
        (im, {"boxes": t["boxes"].numpy(), "labels": t["labels"].numpy(), "image_id": i, "orig_hw": (64, 96)})
        for i, (im, t) in enumerate(zip(images(), targets(), strict=True))
    ]
    batch = collate_detection(samples)
    run = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), opts.grad_scaler())
    return train_step(model, batch, [], TINY, run, iteration=0, opts=opts, last_checkpoint=None).losses


def test_one_training_step_reads_the_device_once():
    cpu_model = tiny_model().train()
    expected = _train_once(cpu_model, device_options(TINY, "cpu"))
    model = tiny_model().train()
    with DeviceGuard() as guard:
        model.to(DEVICE)
        before = host(model.head.cls_score.weight).clone()
        losses = _train_once(model, DeviceOptions(DEVICE))
    assert guard.sync_sites == ["training/step.py:train_step"]  # the logged losses, once per iteration
    assert guard.implicit_ops == ["nonzero@criterion.py:atss_loss"]
    assert losses == pytest.approx(expected, rel=1e-4) and set(losses) == set(LOSS_KEYS)
    after = host(model.head.cls_score.weight)
    torch.testing.assert_close(after, cpu_model.head.cls_score.weight.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.equal(after, before)


# --------------------------------------------------------------------------------------------------
# Planted faults: the guard fails on them


def test_planted_cpu_tensor_in_the_forward_pass_fails(monkeypatch):
    real = atss_mod.grid_points

    def points_on_the_host(feature_hw: Any, strides: Any, *, offset: float, device: Any) -> Any:
        return real(feature_hw, strides, offset=offset)  # the bug: device= dropped

    monkeypatch.setattr(atss_mod, "grid_points", points_on_the_host)
    with DeviceGuard(), pytest.raises(DeviceMixError, match=r"in ops/boxes.py:ltrb_to_xyxy"):
        Detector(tiny_model(), device=DEVICE).predict(images(1))


def test_planted_host_read_in_the_assignment_fails(monkeypatch):
    """The tie check as it was (``if bool(tied.any())``) is a host read inside ``atss_assign``."""

    def nearest_with_a_host_read(distances: torch.Tensor, k: int) -> torch.Tensor:
        values, indices = distances.topk(k + 1, dim=-1, largest=False, sorted=True)
        if bool((values[..., k - 1] == values[..., k]).any()):
            pass
        return indices[..., :k]

    monkeypatch.setattr(assign_mod, "_nearest_k_indices", nearest_with_a_host_read)
    model = tiny_model().train()
    with DeviceGuard(), pytest.raises(HostSyncError, match=r"in assign.py:atss_assign"):
        atss_loss(model.to(DEVICE)(batch_tensor().to(DEVICE)), targets(), TINY)


# --------------------------------------------------------------------------------------------------
# numerics="megengine" is a CPU-only parity tool


def test_megengine_numerics_is_refused_off_the_cpu():
    mge = with_overrides(TINY, {"numerics": "megengine"})
    with pytest.raises(ValueError, match="numerics='megengine' computes GroupNorm with NumPy on the CPU"):
        device_options(mge, DEVICE)
    torch.manual_seed(0)
    model = build_model(mge).eval()
    with torch.no_grad():
        model(batch_tensor())  # fine on the CPU
        with (
            DeviceGuard(),
            pytest.raises(ValueError, match="on meta every head activation would go to the host"),
        ):
            model.to(DEVICE)(batch_tensor().to(DEVICE))

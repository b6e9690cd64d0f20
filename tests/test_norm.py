"""MegEngine-rounded GroupNorm (atssdet.ops.norm) against a literal loop transcription and against torch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atssdet.config import DEMO_PRESETS, ATSSConfig
from atssdet.modeling.atss import ATSS
from atssdet.modeling.head import GroupNorm
from atssdet.ops.norm import megengine_group_norm

f32 = np.float32


def _loop_reference(x: np.ndarray, g: int, w: np.ndarray, b: np.ndarray, dy: np.ndarray, eps: float):
    """Scalar float32 loops in the order MegEngine's reference CPU kernel runs them (forward + backward)."""
    n, c, h, wd = x.shape
    d, hw = c // g, h * wd
    xs, dys = x.reshape(n * g, d * hw), dy.reshape(n, c, hw)
    y = np.empty_like(x).reshape(n * g, d * hw)
    mean, inv = np.empty(n * g, f32), np.empty(n * g, f32)
    for i in range(n * g):
        acc = f32(0)
        for v in xs[i]:
            acc = f32(acc + v)
        mean[i] = f32(acc / f32(d * hw))
        acc = f32(0)
        for v in xs[i]:
            acc = f32(acc + f32(f32(v - mean[i]) * f32(v - mean[i])))
        var = f32(acc / f32(d * hw))
        inv[i] = f32(f32(1) / f32(np.sqrt(f32(var + f32(eps)))))
        for j in range(d):
            ch = (i % g) * d + j
            s = f32(inv[i] * w[ch])
            bb = f32(f32(-s * mean[i]) + b[ch])
            y[i, j * hw : (j + 1) * hw] = f32(s * xs[i, j * hw : (j + 1) * hw]) + bb
    ds, db = np.zeros((n, c), f32), np.zeros((n, c), f32)
    xc = x.reshape(n, c, hw)
    for i in range(n):
        for ch in range(c):
            for k in range(hw):
                db[i, ch] = f32(db[i, ch] + dys[i, ch, k])
                ds[i, ch] = f32(ds[i, ch] + f32(xc[i, ch, k] * dys[i, ch, k]))
    scale = f32(f32(1) / f32(d * hw))
    dx = np.empty_like(xc)
    dw, dbias = np.zeros(c, f32), np.zeros(c, f32)
    for i in range(n):
        for gi in range(g):
            r = i * g + gi
            ds_v = db_v = f32(0)
            for j in range(d):
                ds_v = f32(ds_v + f32(ds[i, gi * d + j] * w[gi * d + j]))
                db_v = f32(db_v + f32(db[i, gi * d + j] * w[gi * d + j]))
            c2 = f32(f32(f32(f32(f32(db_v * mean[r]) - ds_v) * inv[r]) * inv[r]) * inv[r]) * scale
            c3 = f32(f32(-c2 * mean[r]) - f32(f32(db_v * inv[r]) * scale))
            for j in range(d):
                ch = gi * d + j
                c1 = f32(inv[r] * w[ch])
                dx[i, ch] = (c1 * dys[i, ch] + c2 * xc[i, ch]) + c3
                dw[ch] = f32(dw[ch] + f32(f32(ds[i, ch] - f32(db[i, ch] * mean[r])) * inv[r]))
                dbias[ch] = f32(dbias[ch] + db[i, ch])
    return y.reshape(x.shape), dx.reshape(x.shape), dw, dbias


def _inputs(seed: int, shape=(2, 4, 5, 7), offset: float = 0.0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 3 + offset).astype(f32)
    w = rng.uniform(0.5, 1.5, shape[1]).astype(f32)
    b = rng.normal(size=shape[1]).astype(f32)
    dy = rng.normal(size=shape).astype(f32)
    return x, w, b, dy


@pytest.mark.parametrize("offset", [0.0, 1000.0])  # a large mean makes sequential sums round visibly
def test_bit_identical_to_kernel_loops(offset: float) -> None:
    x, w, b, dy = _inputs(0, offset=offset)
    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    y = megengine_group_norm(xt, 2, wt, bt, 1e-5)
    y.backward(torch.from_numpy(dy))
    y_ref, dx_ref, dw_ref, db_ref = _loop_reference(x, 2, w, b, dy, 1e-5)
    np.testing.assert_array_equal(y.detach().numpy(), y_ref)
    assert xt.grad is not None and wt.grad is not None and bt.grad is not None
    np.testing.assert_array_equal(xt.grad.numpy(), dx_ref)
    np.testing.assert_array_equal(wt.grad.numpy(), dw_ref)
    np.testing.assert_array_equal(bt.grad.numpy(), db_ref)


def test_sums_are_sequential_not_pairwise() -> None:
    """2^24 then 4096 ones: a left-to-right float32 sum never moves off 2^24 (2^24 + 1 rounds back)."""
    x = np.ones((1, 1, 1, 4097), f32)
    x[0, 0, 0, 0] = 2.0**24
    one, zero = torch.ones(1), torch.zeros(1)
    y = megengine_group_norm(torch.from_numpy(x), 1, one, zero, 1e-5).numpy().ravel()
    mean_sequential = np.float64(f32(f32(2.0**24) / f32(4097)))
    mean_exact = (2.0**24 + 4096) / 4097
    assert mean_exact - mean_sequential > 0.9
    centred = x.astype(np.float64).ravel() - mean_sequential
    expected = centred / np.sqrt((centred**2).mean() + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    y_torch = F.group_norm(torch.from_numpy(x), 1, one, zero, 1e-5).numpy().ravel()
    assert abs(y_torch[1] - y[1]) > 1e-5 * abs(y[1])  # torch's (accurate) mean gives visibly other outputs


@pytest.mark.parametrize("seed", [1, 2])
def test_matches_torch_group_norm_within_float_error(seed: int) -> None:
    x, w, b, dy = _inputs(seed, shape=(2, 64, 9, 11))
    results = []
    for fn in (megengine_group_norm, F.group_norm):
        xt = (
            torch.from_numpy(x).double().requires_grad_()
            if fn is F.group_norm
            else torch.from_numpy(x).requires_grad_()
        )
        wt = torch.tensor(w, dtype=xt.dtype, requires_grad=True)
        bt = torch.tensor(b, dtype=xt.dtype, requires_grad=True)
        y = fn(xt, 32, wt, bt, 1e-5)
        y.backward(torch.from_numpy(dy).to(xt.dtype))
        results.append([t.detach().double() for t in (y, xt.grad, wt.grad, bt.grad)])  # type: ignore[union-attr]
    for ours, exact in zip(*results, strict=True):
        assert float((ours - exact).abs().max() / exact.abs().max()) < 1e-5


def test_module_keys_and_numerics_switch() -> None:
    cfg = DEMO_PRESETS["atss_demo_cpu"]
    torch_model = ATSS(cfg).eval()
    mge_model = ATSS(dataclasses.replace(cfg, numerics="megengine")).eval()
    assert list(torch_model.state_dict()) == list(mge_model.state_dict())  # same checkpoint keys
    mge_model.load_state_dict(torch_model.state_dict())
    norms = [m for m in mge_model.modules() if isinstance(m, GroupNorm)]
    assert norms and all(m.numerics == "megengine" for m in norms)
    images = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        a, b = torch_model(images), mge_model(images)
    assert float((a.cls_logits - b.cls_logits).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="numerics"):
        ATSSConfig(numerics="fast")


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        megengine_group_norm(torch.zeros(1, 6, 2, 2), 4, torch.ones(6), torch.zeros(6))


def test_frozen_bn_paths() -> None:
    """FrozenBN: MegEngine's x * s + (b - rm * s) with numerics="megengine"; with numerics="torch" the
    one-pass addcmul gives the same values up to one rounding."""
    from atssdet.modeling.resnet import FrozenBN

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7)
    fast, exact = FrozenBN(8), FrozenBN(8, numerics="megengine")
    fast.weight.copy_(torch.rand(8) + 0.5)
    fast.bias.copy_(torch.randn(8))
    fast.running_mean.copy_(torch.randn(8))
    fast.running_var.copy_(torch.rand(8) + 0.5)
    exact.load_state_dict(fast.state_dict())
    s = fast.weight * (fast.running_var + 1e-5).rsqrt()
    expected = x * s.view(1, -1, 1, 1) + (fast.bias - fast.running_mean * s).view(1, -1, 1, 1)
    assert torch.equal(exact.eval()(x), expected)
    assert torch.equal(exact.train()(x), expected)
    eval_out = fast.eval()(x)
    assert torch.equal(fast.train()(x), eval_out)
    assert float((eval_out - expected).abs().max()) <= 4e-6 * float(expected.abs().max())
    assert list(fast.state_dict()) == ["weight", "bias", "running_mean", "running_var"]

"""GPU training options, checked on the CPU where they can be (issue 18, item 2).

bf16 autocast runs on the CPU, so a bf16 training run is tested here; fp16 (GradScaler) is CUDA only
and refused on the CPU. channels_last and ``torch.compile`` are checked for equal losses; compile uses
dynamo's ``eager`` backend here with ``fullgraph=True`` (it proves the whole forward pass traces
without a graph break), because Inductor's CPU code generation takes over two minutes for the first
step on this 2-core machine; ``benchmarks/gpu_check.sh`` runs Inductor on a GPU. NCCL selection and
SyncBN conversion are checked with the process group faked; pinned batches need CUDA
(``tests/test_gpu.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from atssdet import distributed
from atssdet.cli import main as cli_main
from atssdet.config import with_overrides
from atssdet.training.checkpoint import load_checkpoint
from atssdet.training.device import DeviceOptions, cudnn_autotuning, device_options, parse_amp
from atssdet.training.log import LOG_NAME
from tests.test_train import TINY_CFG, make_dataset, run_tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # training runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_dataset(tmp_path_factory.mktemp("synth"))


def losses_of(result: Any) -> list[float]:
    return [r["total_loss"] for r in result.losses]


def test_amp_modes():
    assert parse_amp(None) is None and parse_amp(False) is None
    assert parse_amp(True) == "fp16" and parse_amp("fp16") == "fp16" and parse_amp("bf16") == "bf16"
    with pytest.raises(ValueError, match="amp must be one of bf16, fp16"):
        parse_amp("fp8")
    with pytest.raises(ValueError, match="--amp needs a CUDA device for fp16.*use --amp bf16 on the CPU"):
        device_options(TINY_CFG, "cpu", amp="fp16")
    opts = device_options(TINY_CFG, "cpu", amp="bf16")
    assert opts.amp == "bf16" and not opts.grad_scaler().is_enabled()  # bf16 needs no loss scaling
    with opts.autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    with DeviceOptions(torch.device("cpu")).autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32


def test_bf16_training_on_the_cpu_learns_and_logs_its_mode(dataset, tmp_path):
    """oneDNN off: its AMX bf16 convolutions gave NaN losses here in some runs, depending on nothing
    but memory layout and timing (the same run passes with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, i.e.
    without AMX; docs/gpu.md). PyTorch's own bf16 kernels run the same recipe reliably."""
    with torch.backends.mkldnn.flags(enabled=False):
        fp32 = run_tiny(dataset, tmp_path / "fp32", max_iters=12)
        bf16 = run_tiny(dataset, tmp_path / "bf16", max_iters=12, amp="bf16")
    first, last = losses_of(bf16)[0], sum(losses_of(bf16)[-3:]) / 3
    assert last < 0.8 * first, losses_of(bf16)
    # bfloat16 keeps 8 mantissa bits: the first (same-weights) loss agrees to about 1%
    assert first == pytest.approx(losses_of(fp32)[0], rel=0.03)
    start = json.loads((tmp_path / "bf16" / LOG_NAME).read_text().splitlines()[0])
    assert (start["amp"], start["channels_last"], start["compile"]) == ("bf16", False, False)
    assert load_checkpoint(bf16.checkpoint)["scaler"] is None


def test_channels_last_trains_the_same_model(dataset, tmp_path):
    nchw = run_tiny(dataset, tmp_path / "nchw", max_iters=3)
    nhwc = run_tiny(dataset, tmp_path / "nhwc", max_iters=3, channels_last=True)
    assert losses_of(nhwc) == pytest.approx(losses_of(nchw), rel=1e-4)
    state = load_checkpoint(nhwc.checkpoint)["model"]
    assert state["head.cls_score.weight"].is_contiguous(memory_format=torch.channels_last)


def test_compile_traces_the_whole_forward_and_keeps_the_checkpoint_keys(dataset, tmp_path, monkeypatch):
    calls: list[Any] = []
    real_compile = torch.compile

    def eager_compile(net: torch.nn.Module) -> Any:
        calls.append(type(net).__name__)
        return real_compile(net, backend="eager", fullgraph=True)

    plain = run_tiny(dataset, tmp_path / "plain", max_iters=2)
    monkeypatch.setattr(torch, "compile", eager_compile)
    done = run_tiny(dataset, tmp_path / "compiled", max_iters=2, compile=True)
    assert calls == ["ATSS"]
    assert losses_of(done) == pytest.approx(losses_of(plain), rel=1e-5)
    keys = set(load_checkpoint(done.checkpoint)["model"])
    assert keys == set(load_checkpoint(plain.checkpoint)["model"]) and not any("_orig_mod" in k for k in keys)


def test_cudnn_autotuning_is_scoped_to_the_run():
    before = torch.backends.cudnn.benchmark
    with cudnn_autotuning(not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before


def test_torchrun_on_cuda_picks_nccl(monkeypatch):
    joined: dict[str, Any] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: joined.setdefault("device", dev))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, timeout: joined.setdefault("backend", backend)
    )
    monkeypatch.setattr(distributed, "info", lambda: None)
    distributed.init_distributed(device="cuda")
    assert joined == {"device": torch.device("cuda", 1), "backend": "nccl"}
    assert distributed.default_backend(torch.device("cpu")) == "gloo"


def test_syncbn_is_converted_under_ddp_and_refused_on_cpu(monkeypatch):
    from atssdet.training.loop import _training_state

    cfg = with_overrides(TINY_CFG, {"backbone_norm": "SyncBN"})
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="SyncBN needs CUDA devices under DDP"):
        device_options(cfg, "cpu")
    run = _training_state(
        cfg,
        None,
        seed=0,
        opts=DeviceOptions(torch.device("cpu")),
        global_batch=4,
        init_backbone=None,
        finetune=None,
    )
    kinds = {type(m).__name__ for m in run.model.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds


def test_cli_train_passes_the_gpu_flags(tmp_path: Path, monkeypatch):
    import atssdet.training

    seen: list[dict[str, Any]] = []

    def fake_train(cfg: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        raise atssdet.training.TrainingError("stop here")

    monkeypatch.setattr(atssdet.training, "train", fake_train)
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    base = ["train", "--data", str(ann), "--images", str(tmp_path), "--out", str(tmp_path / "out")]
    assert cli_main([*base, "--amp"]) == 1 and seen[-1]["amp"] == "fp16"
    flags = ["--amp", "bf16", "--channels-last", "--compile", "--cudnn-benchmark"]
    assert cli_main([*base, *flags]) == 1
    assert {k: seen[-1][k] for k in ("amp", "channels_last", "compile", "cudnn_benchmark")} == {
        "amp": "bf16", "channels_last": True, "compile": True, "cudnn_benchmark": True,
    }  # fmt: skip
    assert "amp" not in (cli_main(base), seen[-1])[1]  # omitted: the library's default (float32)

"""atssdet.loader: the one way a model arrives (zoo name, checkpoint file, both, or an ONNX export)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atssdet.config import DEMO_PRESETS, PRESETS
from atssdet.convert import CheckpointError, save_safetensors
from atssdet.loader import load, load_runner
from atssdet.modeling.atss import build_model
from atssdet.runtime.torch_runner import TorchRunner
from tests.conftest import R18, REPO_ROOT

DEMO = DEMO_PRESETS["atss_demo_cpu"]  # a small model: fast to build


@pytest.fixture(scope="module")
def demo_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(DEMO)
    path = tmp_path_factory.mktemp("loader") / "demo.safetensors"
    return save_safetensors(model.state_dict(), path, cfg=DEMO)


def test_file_config_wins_over_a_zoo_name_and_weights_land(demo_safetensors: Path) -> None:
    model = load(R18, weights=demo_safetensors)  # a zoo name only fills in for files without a config
    assert model.cfg == DEMO and not model.training
    saved = build_model(DEMO)
    from atssdet.convert import load_weights

    load_weights(saved, demo_safetensors)
    for (k, a), b in zip(model.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    again = load(DEMO, weights=demo_safetensors, overrides={"test_image_short_size": 160}, device="cpu")
    assert again.cfg.test_image_short_size == 160 and next(again.parameters()).device.type == "cpu"


def test_what_each_missing_piece_says(tmp_path: Path, r18_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"give a zoo model name \(--model NAME\) and/or a weights file"):
        load()
    with pytest.raises(CheckpointError, match=r"gone\.pt: no such file"):
        load(R18, weights=tmp_path / "gone.pt")
    with pytest.raises(CheckpointError) as info:
        load(weights=r18_checkpoint)
    message = str(info.value)  # what predict and eval have always printed, in one message
    assert str(r18_checkpoint) in message and "does not say which model" in message
    assert "carries no config; name the model with --model NAME" in message
    with pytest.raises(ValueError, match="needs weights=FILE"):
        load(DEMO)
    with pytest.raises(ValueError, match="unknown model 'res9000'"):
        load("res9000")


def test_onnx_files_go_to_load_runner_and_refuse_overrides(tmp_path: Path) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")  # refused before it is opened
    with pytest.raises(
        ValueError, match=r"m\.onnx: an ONNX file runs in ONNX Runtime; open it with load_runner"
    ):
        load(weights=onnx)
    with pytest.raises(ValueError, match=r"m\.onnx: numerics='megengine' needs the PyTorch model"):
        load_runner(weights=onnx, overrides={"numerics": "megengine"})
    with pytest.raises(ValueError, match="overriding test_nms does not apply to an ONNX file"):
        load_runner(weights=onnx, overrides={"test_nms": 0.5})


def test_load_runner_wraps_the_model_on_the_resolved_device(demo_safetensors: Path) -> None:
    runner = load_runner(weights=demo_safetensors, device="cpu")
    assert isinstance(runner, TorchRunner) and runner.cfg == DEMO and runner.device == torch.device("cpu")
    assert not runner.model.training
    assert PRESETS[R18] != DEMO


def test_zoo_describes_models_without_torch() -> None:
    code = "import sys, atssdet.zoo, atssdet.cli; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

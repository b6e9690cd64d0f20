"""MegEngine checkpoint conversion: layout handling, strict key/shape checks, safe unpickling."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from atssdet.config import PRESETS
from atssdet.convert import (
    CheckpointError,
    load_megengine_pickle,
    load_safetensors,
    load_weights,
    megengine_to_torch,
    save_safetensors,
)
from atssdet.modeling import build_model
from tests.conftest import R18, run_cli


def manifest_checkpoint(manifest_path: Path, seed: int = 0) -> collections.OrderedDict[str, np.ndarray]:
    """A MegEngine-format state dict with the manifest's keys, order and shapes and random values."""
    manifest = json.loads(manifest_path.read_text())
    rng = np.random.default_rng(seed)
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for entry in manifest["state_dict"]:
        shape = tuple(entry["shape"])
        value = rng.standard_normal(shape, dtype=np.float32)
        if entry["key"].endswith("running_var"):
            value = np.abs(value) + 0.5
        out[entry["key"]] = value
    return out


@pytest.mark.parametrize("variant", sorted(PRESETS))
def test_manifest_checkpoint_loads_strictly(reference_dir, tmp_path, variant):
    arrays = manifest_checkpoint(reference_dir / f"manifest_{variant}.json")
    path = tmp_path / f"{variant}.pkl"
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=4)
    loaded = load_megengine_pickle(path)
    assert list(loaded) == list(arrays)
    model = build_model(PRESETS[variant])
    state = megengine_to_torch(loaded, model, source=str(path))
    model.load_state_dict(state, strict=True)
    own = model.state_dict()
    assert set(own) == set(arrays)
    for key, value in arrays.items():
        tensor = own[key]
        if value.ndim == 5:  # (groups, out/g, in/g, kh, kw) -> (out, in/g, kh, kw)
            g, opg = value.shape[:2]
            for gi in (0, g - 1):
                np.testing.assert_array_equal(tensor[gi * opg : (gi + 1) * opg].numpy(), value[gi])
        np.testing.assert_array_equal(tensor.numpy().reshape(-1), value.reshape(-1), err_msg=key)
    del model, state, own, loaded, arrays


def test_reference_checkpoint_facts(r18_checkpoint, reference_dir):
    facts = json.loads((reference_dir / f"{R18}.seed0.checkpoint.json").read_text())
    raw = gzip.decompress(r18_checkpoint.read_bytes())
    assert len(raw) == facts["pickle_bytes"]
    assert hashlib.sha256(raw).hexdigest() == facts["pickle_sha256"]
    arrays = load_megengine_pickle(r18_checkpoint)
    assert len(arrays) == facts["num_entries"] == 155
    assert sum(a.size for a in arrays.values()) == 19_287_322


def test_training_checkpoint_wrapper_is_accepted(tmp_path, r18_checkpoint):
    arrays = load_megengine_pickle(r18_checkpoint)
    path = tmp_path / "epoch_5.pkl"
    with open(path, "wb") as f:
        pickle.dump({"epoch": 5, "state_dict": arrays}, f, protocol=4)
    again = load_megengine_pickle(path)
    assert list(again) == list(arrays)


def test_safetensors_round_trip_keeps_config(tmp_path, r18_model):
    path = save_safetensors(r18_model.state_dict(), tmp_path / "m.safetensors", cfg=r18_model.cfg)
    tensors, cfg = load_safetensors(path)
    assert cfg == r18_model.cfg
    for key, value in r18_model.state_dict().items():
        assert torch.equal(tensors[key], value), key
    assert not list(tmp_path.glob("*.tmp"))


def test_bfloat16_safetensors_load_upcast(tmp_path, r18_model):
    """A bfloat16 file (NumPy has no bfloat16) loads: every tensor upcast exactly to float32."""
    bf16 = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in r18_model.state_dict().items()
    }
    path = save_safetensors(bf16, tmp_path / "half.safetensors", cfg=r18_model.cfg)
    tensors, cfg = load_safetensors(path)
    assert cfg == r18_model.cfg and all(t.dtype != torch.bfloat16 for t in tensors.values())
    model = build_model(r18_model.cfg)
    load_weights(model, path)
    for key, value in bf16.items():
        assert torch.equal(model.state_dict()[key], value.to(model.state_dict()[key].dtype)), key


def test_checked_reader_equals_numpy_unpickling(r18_checkpoint):
    """The capped, checked reader returns what numpy's own unpickling does (writable float32 arrays)."""
    import gzip as gz

    ours = load_megengine_pickle(r18_checkpoint)
    plain = pickle.loads(gz.decompress(r18_checkpoint.read_bytes()))
    assert list(ours) == list(plain)
    for key, value in plain.items():
        assert ours[key].dtype == value.dtype and ours[key].flags.writeable, key
        np.testing.assert_array_equal(ours[key], value)


def test_mismatch_is_named(tmp_path, r18_checkpoint):
    arrays = load_megengine_pickle(r18_checkpoint)
    arrays.pop("head.ctrness.bias")
    arrays["head.extra.weight"] = np.zeros((3,), np.float32)
    arrays["head.cls_score.weight"] = np.zeros((81, 256, 3, 3), np.float32)
    model = build_model(PRESETS[R18])
    with pytest.raises(CheckpointError) as info:
        megengine_to_torch(arrays, model, source="bad.pkl")
    msg = str(info.value)
    assert "bad.pkl" in msg
    assert "missing key head.ctrness.bias" in msg
    assert "unexpected key head.extra.weight" in msg
    assert "head.cls_score.weight" in msg and "(81, 256, 3, 3)" in msg


def test_nan_weights_rejected(r18_checkpoint):
    arrays = load_megengine_pickle(r18_checkpoint)
    arrays["head.scale_list"] = np.array([1, np.nan, 1, 1, 1], np.float32)
    with pytest.raises(CheckpointError, match="head.scale_list contains NaN"):
        megengine_to_torch(arrays, build_model(PRESETS[R18]))


class _RunsCode:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        import builtins

        return (builtins.eval, ("__import__('pathlib').Path('EVAL_MARKER').touch()",))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "PWNED"
    payload = _RunsCode(f"touch {marker}") if kind == "os.system" else _Evals()
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump(collections.OrderedDict(w=payload), f, protocol=4)
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="refusing to load") as info:
            load_megengine_pickle(path)
        result = run_cli("convert", str(path), str(tmp_path / "out.safetensors"), "--model", R18)
    finally:
        os.chdir(old)
    assert str(path) in str(info.value)
    assert ("posix.system" in str(info.value) or "os.system" in str(info.value)) or "eval" in str(info.value)
    assert result.returncode == 2
    assert "refusing to load" in result.stderr
    assert not marker.exists() and not (tmp_path / "EVAL_MARKER").exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_corrupt_and_unknown_files(tmp_path, r18_checkpoint):
    raw = gzip.decompress(r18_checkpoint.read_bytes())
    truncated = tmp_path / "trunc.pkl"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="trunc.pkl: corrupt or truncated"):
        load_megengine_pickle(truncated)
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a pickle"):
        load_megengine_pickle(text)
    with pytest.raises(CheckpointError, match="no such file|cannot read"):
        load_megengine_pickle(tmp_path / "missing.pkl")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        load_weights(build_model(PRESETS[R18]), other)


def test_cli_convert_then_load(tmp_path, r18_checkpoint, r18_model):
    out = tmp_path / "r18.safetensors"
    result = run_cli("convert", str(r18_checkpoint), str(out), "--model", R18)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    model = build_model(PRESETS[R18])
    load_weights(model, out)
    for key, value in r18_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_cli_convert_wrong_model_names_mismatch(tmp_path, r18_checkpoint):
    result = run_cli(
        "convert",
        str(r18_checkpoint),
        str(tmp_path / "x.safetensors"),
        "--model",
        "atss_res50_coco_3x_800size",
    )
    assert result.returncode == 2
    assert "shape mismatch" in result.stderr and str(r18_checkpoint) in result.stderr
    assert not (tmp_path / "x.safetensors").exists()

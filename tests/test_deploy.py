"""Deployment exports on a tiny random model: ONNX fp16/int8, OpenVINO fp32/fp16/int8 IRs, the CLI,
the per-layer int8 sensitivity pass, and the errors for bad requests (issue #16; accuracy on the demo
model is measured by benchmarks/bench_deploy.py, parity on the reference res18 by tests/test_openvino.py).
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from atssdet.cli import main
from atssdet.config import DEMO_PRESETS, with_overrides
from atssdet.convert import save_safetensors
from atssdet.detector import Detector
from atssdet.errors import ModelFileError, OptionError
from atssdet.modeling.atss import build_model

pytest.importorskip("onnx", reason="onnx is an optional extra (pip install atssdet[export])")
pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra (pip install atssdet[export])")

from atssdet.export_formats import export_model  # noqa: E402

# Tolerances: >= 3x the largest difference to PyTorch fp32 measured on these inputs (fp16 ONNX
# 1.5e-4, int8 ONNX 7e-4 / OpenVINO 1.5e-3 on the top-5 scores of the tiny model).
FP16_SCORE_ATOL = 1e-3
INT8_SCORE_ATOL = 2e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random demo-sized model tested at 96 px, its .safetensors, and a folder of 3 calibration images."""
    torch.manual_seed(0)
    cfg = with_overrides(
        DEMO_PRESETS["atss_demo_cpu"], {"test_image_short_size": 96, "test_image_max_size": 128}
    )
    model = build_model(cfg).eval()
    root = tmp_path_factory.mktemp("deploy")
    rng = np.random.default_rng(0)
    calib = root / "calib"
    calib.mkdir()
    for i in range(3):
        image = rng.integers(0, 255, (100 + 10 * i, 120, 3), dtype=np.uint8)
        cv2.rectangle(image, (10, 20), (60 + 10 * i, 80), (255, 255, 255), -1)
        cv2.imwrite(str(calib / f"im{i}.png"), image)
    st = save_safetensors(model.state_dict(), root / "tiny.safetensors", cfg=cfg)
    return model, st, calib


def _top_scores(dets, k=5):
    return torch.stack([d.scores[:k] for d in dets])


def _reference(model, images):
    with torch.inference_mode():
        return Detector(model, device="cpu").predict(images)


def test_onnx_fp16_and_int8_stay_close_and_int8_reports_kept_layers(tiny, tmp_path):
    model, _, calib = tiny
    images = sorted(str(p) for p in calib.iterdir())
    want = _top_scores(_reference(model, images))
    fp16 = export_model(model, tmp_path / "m16.onnx", precision="fp16")
    got16 = Detector.from_checkpoint(fp16).predict(images)
    torch.testing.assert_close(_top_scores(got16), want, atol=FP16_SCORE_ATOL, rtol=0)
    reports: list[str] = []
    int8 = export_model(
        model, tmp_path / "m8.onnx", precision="int8", calibration=calib, keep_float=2, report=reports.append
    )
    detector = Detector.from_checkpoint(int8)
    torch.testing.assert_close(_top_scores(detector.predict(images)), want, atol=INT8_SCORE_ATOL, rtol=0)
    meta = detector.runner.metadata
    kept = json.loads(meta["kept_float"])
    assert meta["precision"] == "int8" and meta["calibration_images"] == "3" and len(kept) >= 2
    marked = [line for line in reports[0].splitlines() if line.startswith(" * ")]
    assert len(marked) == 2 and all(
        any(line.endswith(n) or f"{n} (+" in line for line in marked) for n in kept[:1]
    )
    import onnx

    graph = onnx.load(str(int8)).graph
    quantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    # Every convolution reads a dequantized (int8) weight except those of the two layers kept in float.
    float_convs = {name for name, n in convs.items() if n.input[1] not in quantized}
    assert float_convs == set(kept)


def test_openvino_ir_through_cli_export_predict_and_detector(tiny, tmp_path, capsys):
    pytest.importorskip("openvino", reason="openvino is an optional extra (pip install atssdet[deploy])")
    model, st, calib = tiny
    images = sorted(str(p) for p in calib.iterdir())
    want = _reference(model, images)
    xml = tmp_path / "m.xml"
    assert main(["export", "--weights", str(st), "--format", "openvino", "--out", str(xml)]) == 0
    assert f"wrote {xml}, {xml.with_suffix('.bin')}" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert main(["predict", *images, "--weights", str(xml), "--out", str(out)]) == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert [len(im["detections"]) for im in doc["images"]] == [len(w) for w in want]
    got = Detector.from_checkpoint(xml).predict(images)
    for g, w in zip(got, want, strict=True):  # fp32 IR: the PyTorch results
        torch.testing.assert_close(g.scores, w.scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(g.boxes, w.boxes, atol=0.02, rtol=0)
    int8 = export_model(model, tmp_path / "m8.xml", format="openvino", precision="int8", calibration=calib)
    runner_dets = Detector.from_checkpoint(int8).predict(images)
    assert Detector.from_checkpoint(int8).runner.precision == "int8"
    torch.testing.assert_close(_top_scores(runner_dets), _top_scores(want), atol=INT8_SCORE_ATOL, rtol=0)


def test_bad_requests_name_the_input(tiny, tmp_path, capsys):
    model, st, _ = tiny
    empty = tmp_path / "notimages"
    empty.mkdir()
    (empty / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OptionError, match=r"--calibration .*notimages: no readable image among its 1 files"):
        export_model(model, tmp_path / "m.onnx", precision="int8", calibration=empty)
    with pytest.raises(OptionError, match=r"--calibration .*missing: no such folder"):
        export_model(model, tmp_path / "m.onnx", precision="int8", calibration=tmp_path / "missing")
    with pytest.raises(OptionError, match=r"--precision int8 needs --calibration DIR"):
        export_model(model, tmp_path / "m.onnx", precision="int8")
    with pytest.raises(OptionError, match=r"precision 'int4': expected one of fp32, fp16, bf16, int8"):
        export_model(model, tmp_path / "m.onnx", precision="int4")
    with pytest.raises(OptionError, match=r"--out .*m\.onnx: an openvino export is a \.xml file"):
        export_model(model, tmp_path / "m.onnx", format="openvino")
    with pytest.raises(OptionError, match="--raw-input: only an fp32 ONNX export"):
        export_model(model, tmp_path / "m.onnx", precision="fp16", raw_input=True)
    # The CLI: refused before the model loads, as `atssdet export: error: ...`, exit 2; nothing written.
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(st), "--precision", "bf16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "atssdet export: error: precision 'bf16': --format onnx cannot run it (it does fp32, fp16, int8)"
        in err
    )
    args = [
        "export",
        "--weights",
        str(st),
        "--precision",
        "int8",
        "--calibration",
        str(empty),
        "--out",
        str(out),
    ]
    assert main(args) == 2
    assert "notimages: no readable image" in capsys.readouterr().err
    assert not out.exists()


def test_ir_without_its_bin_is_named(tiny, tmp_path):
    pytest.importorskip("openvino", reason="openvino is an optional extra (pip install atssdet[deploy])")
    from atssdet.runtime.ov_runner import OvRunner

    xml = tmp_path / "m.xml"
    xml.write_text("<net/>")
    with pytest.raises(
        ModelFileError, match=r"m\.bin: no such file: the weights of the OpenVINO IR .*m\.xml"
    ):
        Detector.from_checkpoint(xml)
    xml.with_suffix(".bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelFileError, match=r"m\.xml: OpenVINO cannot read the IR"):
        OvRunner(xml)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_tensorrt_refused_without_cuda(tiny, tmp_path, capsys):
    model, st, _ = tiny
    with pytest.raises(OptionError, match="--format tensorrt: needs a CUDA GPU and there is none here"):
        export_model(model, tmp_path / "m.engine", format="tensorrt", precision="fp16")
    assert (
        main(["export", "--weights", str(st), "--format", "tensorrt", "--out", str(tmp_path / "m.engine")])
        == 2
    )
    assert "atssdet export: error: --format tensorrt: needs a CUDA GPU" in capsys.readouterr().err

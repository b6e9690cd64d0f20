"""Acceptance 1 of the deployment issue: the fp32 OpenVINO IR gives the PyTorch detections on the
reference res18 checkpoint and its three reference images (scores 1e-4, boxes 0.02 px, same classes,
same order up to near-ties: rows whose scores differ by < 1e-4 are compared as a set)."""

from __future__ import annotations

import pytest
import torch

from atssdet.detector import Detector
from tests.conftest import R18
from tests.helpers import assert_dets_match

pytest.importorskip("onnx", reason="onnx is an optional extra (pip install atssdet[export])")
pytest.importorskip("openvino", reason="openvino is an optional extra (pip install atssdet[deploy])")

IMAGES = ("cat.jpg", "synth_600x900.png", "synth_1000x700.png")
# A smaller test resize than the config's 800/1333 keeps the test within its time budget (the graph is
# size-independent: tests/test_export_graph.py).
SIZE = {"short_size": 320, "max_size": 512}


def test_openvino_fp32_ir_matches_pytorch_on_reference_images(r18_model, reference_dir, tmp_path):
    from atssdet.export_formats import export_model
    from atssdet.runtime.ov_runner import OvRunner

    xml = export_model(r18_model, tmp_path / "r18.xml", format="openvino", model_name=R18)
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    paths = [str(reference_dir / name) for name in IMAGES]
    with torch.inference_mode():
        want = Detector(r18_model, device="cpu", **SIZE).predict(paths)
    detector = Detector.from_checkpoint(xml, **SIZE)  # through loader.load_runner, as predict/eval do
    assert isinstance(detector.runner, OvRunner) and detector.runner.precision == "fp32"
    got = detector.predict(paths)
    for g, w in zip(got, want, strict=True):
        assert g.error is None and len(w) > 0
        assert_dets_match(g.to_array().numpy(), w.to_array().numpy(), score_tol=1e-4, box_tol=0.02)

"""The CUDA subset (``pytest -m cuda tests/test_gpu.py``): what only a GPU can check. Skipped without CUDA.

``benchmarks/gpu_check.sh`` runs it on a lent GPU machine. The reference folder is
``$ATSSDET_REFERENCE_DIR`` when set (that machine gets only the repository: the caller copies the
reference files into an ignored folder of it), else ``../shared/reference/megengine``.
Parity is checked in float32 with TF32 off (cuDNN's default TF32 convolutions round the inputs to
10 mantissa bits, far beyond the 1e-4 score tolerance); the benchmark reports the TF32 figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import R18, REFERENCE_DIR
from tests.helpers import assert_dets_match

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"),
]

CUDA = torch.device("cuda")
NAMES = ("small", "cat", "synth_600x900", "synth_1000x700")


@pytest.fixture(scope="module")
def reference() -> Path:
    folder = Path(os.environ.get("ATSSDET_REFERENCE_DIR", REFERENCE_DIR))
    if not (folder / f"{R18}.seed0.pkl.gz").is_file():
        pytest.skip(f"MegEngine reference data not found at {folder} (set ATSSDET_REFERENCE_DIR)")
    return folder


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def r18_on_cuda(reference: Path) -> Any:
    from atssdet.loader import load

    return load(R18, weights=reference / f"{R18}.seed0.pkl.gz").to(CUDA).eval()


def tiny_model() -> Any:
    from tests.test_device_guard import tiny_model as make

    return make()


def test_reference_parity_in_float32(reference, no_tf32):
    """Scores within 1e-4 and boxes within 0.02 px of MegEngine's, detections matched row by row."""
    from atssdet.compat import CompatModel, DetEvaluator

    outputs = dict(np.load(reference / f"{R18}.seed0.outputs.npz"))
    model = r18_on_cuda(reference)
    for name in NAMES:
        data, im_info = outputs[f"{name}__data"], outputs[f"{name}__im_info"]
        if f"{name}__scores" in outputs:  # raw outputs are stored for small and cat
            scores, boxes = CompatModel(model).eval()(image=data, im_info=im_info)
            assert np.abs(scores.cpu().numpy() - outputs[f"{name}__scores"]).max() <= 1e-4, name
            assert np.abs(boxes.cpu().numpy() - outputs[f"{name}__boxes"]).max() <= 0.02, name
        assert_dets_match(DetEvaluator(model).predict(image=data, im_info=im_info), outputs[f"{name}__dets"])


def test_detector_on_cuda_matches_the_cpu(reference, no_tf32):
    from atssdet.detector import Detector
    from atssdet.loader import load

    model = load(R18, weights=reference / f"{R18}.seed0.pkl.gz")
    image = str(reference / "cat.jpg")
    (cpu,) = Detector(model, device="cpu").predict([image])
    gpu_detector = Detector(model, device="cuda")
    assert gpu_detector.default_batch_size() == 4
    (gpu,) = gpu_detector.predict([image, image, image])[:1]
    assert gpu.boxes.device.type == "cpu" and len(gpu) == len(cpu) > 0
    assert_dets_match(gpu.to_array().numpy(), cpu.to_array().numpy())


def test_forward_and_dense_outputs_never_wait_for_the_gpu():
    from atssdet.postprocess import dense_scores_and_boxes

    model = tiny_model().to(CUDA).eval()
    images = torch.rand(2, 3, 64, 96, device=CUDA) * 255
    hw = torch.tensor([[64, 96], [64, 96]], device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            dense_scores_and_boxes(model(images), hw, hw)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_training_steps(amp):
    from atssdet.training.device import DeviceOptions
    from tests.test_device_guard import _train_once

    fp32 = _train_once(tiny_model().to(CUDA).train(), DeviceOptions(CUDA))
    opts = DeviceOptions(CUDA, amp, channels_last=True)
    model = tiny_model().to(CUDA).train().to(memory_format=torch.channels_last)
    losses = _train_once(model, opts)
    assert all(np.isfinite(v) for v in losses.values())
    assert losses["total_loss"] == pytest.approx(fp32["total_loss"], rel=0.05)
    assert opts.grad_scaler().is_enabled() == (amp == "fp16")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_pinned_batches_and_compiled_forward(tmp_path):
    from atssdet.config import PRESETS
    from atssdet.data.coco import COCODetection
    from atssdet.data.loader import build_train_loader
    from atssdet.data.synth import generate_synthetic_dataset
    from atssdet.data.transforms import TrainTransform

    ds = generate_synthetic_dataset(
        tmp_path, num_train=4, num_val=0, image_size=(64, 64), progress=False, log=lambda m: None
    )
    cfg = PRESETS[R18]
    dataset = COCODetection(
        ds.train_ann, ds.train_images, remove_images_without_annotations=True,
        transform=TrainTransform(short_sizes=[64], max_size=64),
    )  # fmt: skip
    loader = build_train_loader(dataset, batch_size=2, seed=0, num_workers=0, pin_memory=True)
    batch = next(iter(loader))
    assert batch.images.is_pinned() and batch.targets[0].boxes.is_pinned()
    assert cfg.num_classes == 80

    model = tiny_model().to(CUDA).eval()
    images = torch.rand(2, 3, 64, 96, device=CUDA) * 255
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model)(images)
    torch.testing.assert_close(compiled.cls_logits, eager.cls_logits, rtol=1e-3, atol=1e-3)


def test_onnx_runtime_cuda_provider(tmp_path, reference):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime has no CUDA provider here ({', '.join(ort.get_available_providers())})")
    from atssdet.detector import Detector
    from atssdet.export import export_onnx

    path = export_onnx(r18_on_cuda(reference).cpu(), tmp_path / "r18.onnx")
    (dets,) = Detector.from_checkpoint(path, device="cuda").predict([str(reference / "cat.jpg")])
    assert len(dets) > 0

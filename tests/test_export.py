"""ONNX export checked in ONNX Runtime against the PyTorch model (res18 reference weights).

Each exported file is made once per session: the dense graph by :func:`export_onnx`, the NMS graph by
the ``export`` CLI (so the CLI test and acceptance 2 share it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atssdet.compat import DetEvaluator
from atssdet.config import COCO_CLASSES, ATSSConfig
from atssdet.data.transforms import images_to_batch
from atssdet.postprocess import dense_scores_and_boxes, select_detections
from atssdet.structures import Detections
from tests.conftest import R18, run_cli
from tests.helpers import assert_dets_match

pytest.importorskip("onnx", reason="onnx is an optional extra (pip install atssdet[export])")
pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra (pip install atssdet[export])")

from atssdet.export import export_onnx  # noqa: E402
from atssdet.runtime.ort_runner import OrtRunner, onnx_signature, read_onnx_metadata  # noqa: E402

IMAGES = ("cat", "synth_600x900", "synth_1000x700")
SCORE_ATOL = 1e-4
BOX_ATOL = 0.02
TIE_ATOL = 1e-5


def _prepare(outputs: dict[str, np.ndarray], names: tuple[str, ...], short: int, max_size: int):
    """Reference images through the seed's resize, batched: (images, image_hw, orig_hw)."""
    return _prepare_sized(outputs, tuple((name, short, max_size) for name in names))


def _prepare_sized(outputs: dict[str, np.ndarray], specs: tuple[tuple[str, int, int], ...]):
    """Like :func:`_prepare` with a (name, short, max) resize per image."""
    resized, infos = [], []
    for name, short, max_size in specs:
        data, info = DetEvaluator.process_inputs(outputs[f"{name}__image"], short, max_size)
        resized.append(data[0].transpose(1, 2, 0).astype(np.uint8))
        infos.append(info[0])
    info = torch.from_numpy(np.stack(infos))
    return images_to_batch(resized), info[:, 0:2], info[:, 2:4]


@pytest.fixture(scope="session")
def dense_onnx(r18_model, tmp_path_factory) -> Path:
    return export_onnx(r18_model, tmp_path_factory.mktemp("onnx") / "r18_dense.onnx", model_name=R18)


@pytest.fixture(scope="session")
def dense_detector(dense_onnx) -> OrtRunner:
    return OrtRunner(dense_onnx, device="cpu")


@pytest.fixture(scope="session")
def nms_cli_run(r18_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "r18_nms.onnx"
    result = run_cli(
        "export", "--model", R18, "--weights", str(r18_checkpoint), "--format", "onnx",
        "--out", str(out), "--dynamic", "--with-nms", "--opset", "17",
    )  # fmt: skip
    return out, result


@pytest.fixture(scope="session")
def nms_onnx(nms_cli_run) -> Path:
    out, result = nms_cli_run
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize(
    "specs",
    [
        (("cat", 160, 256),),  # 213x160, the small__data input (the graph pads it to 224x160)
        (("cat", 160, 256), ("synth_1000x700", 160, 256)),  # batch 2: 213x160 + 229x160
        (("synth_600x900", 320, 480),),  # 320x480, already a multiple of 32
        (("synth_600x900", 320, 480), ("cat", 240, 480)),  # batch 2: 320x480 + 320x240
    ],
    ids=["213x160-n1", "229x160-n2", "320x480-n1", "320x480-n2"],
)
def test_dense_onnx_matches_pytorch(dense_detector, r18_model, r18_outputs, specs):
    """Acceptance 1: one dynamic file, several sizes, batch 1 and 2: scores within 1e-4, boxes 0.02 px."""
    images, image_hw, orig_hw = _prepare_sized(r18_outputs, specs)
    if len(specs) == 1 and specs[0] == ("cat", 160, 256):
        assert torch.equal(images, torch.from_numpy(r18_outputs["small__data"]))
    with torch.inference_mode():
        scores, boxes = dense_scores_and_boxes(r18_model(images), image_hw, orig_hw)
    onnx_scores, onnx_boxes = dense_detector.dense(images, image_hw, orig_hw)
    assert onnx_scores.shape == scores.shape and onnx_boxes.shape == boxes.shape
    torch.testing.assert_close(onnx_scores, scores, atol=SCORE_ATOL, rtol=0)
    torch.testing.assert_close(onnx_boxes, boxes, atol=BOX_ATOL, rtol=0)


def test_dense_onnx_matches_megengine_small(dense_detector, r18_outputs):
    """The ONNX graph reproduces MegEngine's own raw outputs for the small input."""
    data = r18_outputs["small__data"]
    info = r18_outputs["small__im_info"]
    scores, boxes = dense_detector.dense(data, info[:, 0:2], info[:, 2:4])
    np.testing.assert_allclose(scores[0].numpy(), r18_outputs["small__scores"], atol=SCORE_ATOL, rtol=0)
    np.testing.assert_allclose(boxes[0].numpy(), r18_outputs["small__boxes"], atol=BOX_ATOL, rtol=0)


def _assert_same_detections(got: Detections, want: Detections | np.ndarray) -> None:
    """Same count, and row i of ``got`` equals row i of ``want`` (class, box 0.02 px, score 1e-4).

    ONNX Runtime and PyTorch scores differ by ~1e-7, so two detections whose scores are that close
    may come out swapped in a score sort; such a swap is accepted only between rows whose reference
    scores lie within TIE_ATOL of each other.
    """
    if isinstance(want, np.ndarray):
        want = Detections(
            torch.from_numpy(want[:, :4]).float(),
            torch.from_numpy(want[:, 4]).float(),
            torch.from_numpy(want[:, 5]).long(),
        )
    assert len(got) == len(want)
    assert got.labels.dtype == torch.int64
    same = (
        (got.labels[:, None] == want.labels[None, :].long())
        & ((got.boxes[:, None, :] - want.boxes[None, :, :].float()).abs().amax(-1) <= BOX_ATOL)
        & ((got.scores[:, None] - want.scores[None, :].float()).abs() <= SCORE_ATOL)
    )  # [K, K]: got row i matches want row j
    used = torch.zeros(len(want), dtype=torch.bool)
    for i in range(len(got)):
        if same[i, i] and not used[i]:
            j = i
        else:
            candidates = (same[i] & ~used).nonzero().flatten()
            assert candidates.numel() > 0, f"row {i} of {got.to_array()[i].tolist()} matches no reference row"
            j = int(candidates[(candidates - i).abs().argmin()])
            gap = float((want.scores[j] - want.scores[i]).abs())
            assert gap <= TIE_ATOL, f"row {i} matches reference row {j}, whose score differs by {gap}"
        used[j] = True


def test_nms_onnx_equals_predict_on_reference_images(nms_onnx, r18_model, r18_outputs):
    """Acceptance 2: --with-nms detections equal DetEvaluator.predict, one image at a time and batched."""
    detector = OrtRunner(nms_onnx)
    evaluator = DetEvaluator(r18_model)
    for name in IMAGES:
        data, info = DetEvaluator.process_inputs(r18_outputs[f"{name}__image"], 160, 256)
        want = evaluator.predict(data, info)
        (got,) = detector.detect(data, info[:, 0:2], info[:, 2:4], detector.baked)
        assert len(got) == 100
        _assert_same_detections(got, want)
    # A padded batch of different sizes: the graph runs it as given, so compare with PyTorch on the
    # same batch (DetEvaluator.predict would run each padded size separately, as atssdet.predict does).
    images, image_hw, orig_hw = _prepare(r18_outputs, IMAGES, 160, 256)
    with torch.inference_mode():
        wants = select_detections(*dense_scores_and_boxes(r18_model(images), image_hw, orig_hw))
    gots = detector.detect(images, image_hw, orig_hw, detector.baked)
    assert len(gots) == len(wants) == 3
    for got, want in zip(gots, wants, strict=True):
        _assert_same_detections(got, want)


@pytest.mark.parametrize(
    ("class_agnostic", "score_threshold", "max_detections"), [(False, 0.22, 64), (True, 0.13, 75)]
)
def test_nms_onnx_ordering_both_paths(
    r18_model, r18_outputs, tmp_path, class_agnostic, score_threshold, max_detections
):
    """One image keeps <= K survivors (class-major order), the other > K (score-sorted top K)."""
    images, image_hw, orig_hw = _prepare(r18_outputs, ("cat", "synth_1000x700"), 160, 256)
    with torch.inference_mode():
        scores, boxes = dense_scores_and_boxes(r18_model(images), image_hw, orig_hw)
    kwargs = {"score_threshold": score_threshold, "class_agnostic": class_agnostic}
    counts = [len(d) for d in select_detections(scores, boxes, max_detections=10_000, **kwargs)]
    assert min(counts) < max_detections < max(counts)  # both orderings are exercised
    want = select_detections(scores, boxes, max_detections=max_detections, **kwargs)
    path = export_onnx(r18_model, tmp_path / "m.onnx", with_nms=True, max_detections=max_detections, **kwargs)
    runner = OrtRunner(path)
    got = runner.detect(images, image_hw, orig_hw, runner.baked)
    for g, w in zip(got, want, strict=True):
        _assert_same_detections(g, w)
        if len(w) < max_detections:
            assert torch.all(w.labels[1:] >= w.labels[:-1])  # class-major


def test_dense_detector_predict_batch_matches_select_detections(dense_detector, r18_model, r18_outputs):
    """A dense file runs select_detections on ONNX outputs; per-call thresholds and class filters work."""
    images, image_hw, orig_hw = _prepare(r18_outputs, ("cat", "synth_1000x700"), 160, 256)
    with torch.inference_mode():
        scores, boxes = dense_scores_and_boxes(r18_model(images), image_hw, orig_hw)
    classes = torch.tensor([0, 15, 56])
    want = select_detections(scores, boxes, score_threshold=0.1, classes=classes)
    options = dense_detector.baked.replace(score_threshold=0.1, classes=tuple(classes.tolist()))
    got = dense_detector.detect(images, image_hw, orig_hw, options)
    for g, w in zip(got, want, strict=True):
        assert len(w) > 0
        _assert_same_detections(g, w)


def test_metadata_round_trip(dense_onnx, nms_onnx, r18_model):
    meta = read_onnx_metadata(dense_onnx)
    assert ATSSConfig.from_json(meta["config"]) == r18_model.cfg
    assert tuple(json.loads(meta["class_names"])) == COCO_CLASSES
    assert json.loads(meta["strides"]) == [8, 16, 32, 64, 128]
    convention = json.loads(meta["input_convention"])
    assert convention["channel_order"] == "BGR" and convention["pixel_range"] == [0, 255]
    assert convention["pad_to_multiple"] == 32 and convention["pad_inside_graph"] is True
    assert convention["mean"] == [103.53, 116.28, 123.675]
    assert convention["std"] == [57.375, 57.12, 58.395]
    from atssdet import __version__

    assert meta["atssdet_version"] == __version__
    assert meta["model_name"] == R18 and meta["outputs"] == "dense"
    detector = OrtRunner(nms_onnx)
    assert detector.with_nms and detector.class_names == COCO_CLASSES and detector.cfg == r18_model.cfg
    baked = detector.baked
    assert (baked.score_threshold, baked.nms_threshold, baked.max_detections) == (0.05, 0.6, 100)
    assert baked.class_agnostic is False


def test_cli_export_prints_path_and_signature(nms_cli_run):
    out, result = nms_cli_run
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert "images: float[batch, 3, height, width]" in result.stdout
    assert "detections: float[batch, 100, 6]" in result.stdout
    assert "num_detections: int64[batch]" in result.stdout
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind


def test_static_export_has_fixed_shapes(r18_model, tmp_path):
    path = export_onnx(r18_model, tmp_path / "static.onnx", dynamic=False, example_hw=(64, 96))
    sig = onnx_signature(path)
    assert sig.inputs[0] == ("images", "float", (1, 3, 64, 96))
    # 64x96: p3 8x12, p4 4x6, p5 2x3, p6 1x2, p7 1x1 -> 96 + 24 + 6 + 2 + 1 points
    assert sig.outputs == (("scores", "float", (1, 129, 80)), ("boxes", "float", (1, 129, 4)))


def test_bad_inputs_and_options_are_named(dense_detector, nms_onnx, tmp_path):
    from atssdet.cli import main

    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OrtRunner(tmp_path / "missing.onnx")
    detector = dense_detector
    hw = torch.tensor([[64.0, 64.0]])
    with pytest.raises(ValueError, match=r"images must be \[N, 3, H, W\]"):
        detector.run(np.zeros((1, 64, 64, 3), np.float32), hw, hw)
    with pytest.raises(ValueError, match=r"orig_hw must be \[1, 2\]"):
        detector.run(np.zeros((1, 3, 64, 64), np.float32), hw, torch.zeros(2, 2))
    nms = OrtRunner(nms_onnx)
    with pytest.raises(ValueError, match="score_threshold=0.3 differs"):
        nms.detect(np.zeros((1, 3, 64, 64), np.float32), hw, hw, nms.baked.replace(score_threshold=0.3))
    with pytest.raises(ValueError, match="exported with NMS"):
        nms.dense(np.zeros((1, 3, 64, 64), np.float32), hw, hw)
    assert main(["export", "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_missing_optional_dependency_message():
    from atssdet.export import _require

    with pytest.raises(ImportError, match=r"pip install 'atssdet\[export\]'"):
        _require("onnx_not_installed_module")


def test_onnx_nms_conventions_match_torchvision():
    """ONNX Runtime's NonMaxSuppression vs torchvision.ops.nms on hand-made edge cases.

    Suppression needs IoU > threshold: 0.61 is suppressed; at IoU exactly float32(0.6) = 60/100
    torchvision (double threshold) suppresses, plain ONNX Runtime (float32 threshold) keeps, and the
    threshold the export writes (:func:`onnx_iou_threshold`) restores torchvision's decision. Areas
    have no +1 (two 10x10 boxes 1 px apart: IoU 90/110), zero-area duplicates never suppress each
    other, and a score equal to the threshold is dropped (strict >).
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from torchvision.ops import nms

    from atssdet.export_graph import onnx_iou_threshold

    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "thr"], ["sel"])
    graph = helper.make_graph(
        [node],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, None, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, None]),
            helper.make_tensor_value_info("max", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("thr", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def ort_keep(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
        feeds = {
            "boxes": boxes[None],
            "scores": scores[None, None],
            "max": np.array([100], np.int64),
            "iou": np.array([iou], np.float32),
            "thr": np.array([0.05], np.float32),
        }
        return session.run(None, feeds)[0][:, 2].tolist()

    cases = {
        "iou_equal_threshold": ([[0, 0, 10, 10], [0, 0, 10, 6]], [0.9, 0.8], [0]),
        "iou_above_threshold": ([[0, 0, 10, 10], [0, 0, 10, 6.1]], [0.9, 0.8], [0]),
        "iou_below_threshold": ([[0, 0, 10, 10], [0, 0, 10, 5.9]], [0.9, 0.8], [0, 1]),
        "no_plus_one": ([[0, 0, 10, 10], [1, 0, 11, 10]], [0.9, 0.8], [0]),
        "zero_area_duplicates": ([[5, 5, 5, 5], [5, 5, 5, 5]], [0.9, 0.8], [0, 1]),
        "score_at_threshold": ([[0, 0, 1, 1], [5, 5, 6, 6]], [0.5, 0.05], [0]),
    }
    for name, (box_list, score_list, expected) in cases.items():
        boxes = np.array(box_list, np.float32)
        scores = np.array(score_list, np.float32)
        above = torch.from_numpy(scores) > 0.05
        kept = nms(torch.from_numpy(boxes)[above], torch.from_numpy(scores)[above], 0.6)
        assert above.nonzero().flatten()[kept].tolist() == expected, name
        assert ort_keep(boxes, scores, onnx_iou_threshold(0.6)) == expected, name
    assert ort_keep(
        np.array([[0, 0, 10, 10], [0, 0, 10, 6]], np.float32), np.array([0.9, 0.8], np.float32), 0.6
    ) == [0, 1]
    assert onnx_iou_threshold(0.5) == 0.5 and onnx_iou_threshold(0.6) < 0.6


def test_detector_and_cli_predict_run_onnx_files(r18_model, r18_outputs, dense_onnx, nms_onnx, tmp_path):
    """`Detector.from_checkpoint(x.onnx)` and `predict --weights x.onnx` give PyTorch's detections."""
    import cv2

    from atssdet.detector import Detector

    images = [r18_outputs[f"{name}__image"] for name in ("cat", "synth_600x900")]
    ref = Detector(r18_model, device="cpu", short_size=160, max_size=256).predict(images, batch_size=2)
    for path in (dense_onnx, nms_onnx):
        det = Detector.from_checkpoint(path, short_size=160, max_size=256)
        ours = det.predict(images, batch_size=2)
        for a, b in zip(ours, ref, strict=True):
            assert len(b) > 0 and a.names == b.names
            assert_dets_match(a.to_array().numpy(), b.to_array().numpy(), score_tol=1e-4, box_tol=0.02)
    with pytest.raises(ValueError, match="flip TTA"):
        det = Detector.from_checkpoint(nms_onnx)
        det.predict(images[:1], options=det.options.replace(flip_tta=True))
    image_path = tmp_path / "cat.png"
    cv2.imwrite(str(image_path), images[0])
    result = run_cli("predict", str(image_path), "--weights", str(dense_onnx), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert any((tmp_path / "out").iterdir())


@pytest.fixture(scope="session")
def raw_cli_run(r18_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "r18_raw.onnx"
    result = run_cli(
        "export", "--model", R18, "--weights", str(r18_checkpoint), "--out", str(out), "--with-nms",
        "--raw-input",
    )  # fmt: skip
    return out, result


def test_raw_input_onnx_reproduces_megengine_from_the_decoded_image(raw_cli_run, r18_outputs):
    """--raw-input: cv2.imread's uint8 image in, MegEngine's DetEvaluator.predict detections out (the
    resize runs inside the graph, bit-exact with cv2.INTER_LINEAR), for three sizes in one dynamic file."""
    import onnxruntime as ort

    out, result = raw_cli_run
    assert result.returncode == 0, result.stderr
    assert "image: uint8[height, width, 3]" in result.stdout
    assert "detections: float[1, 100, 6]" in result.stdout and "num_detections: int64[1]" in result.stdout
    assert read_onnx_metadata(out)["input_format"] == "raw"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for name in IMAGES:
        detections, count = session.run(None, {"image": r18_outputs[f"{name}__image"]})
        got = detections[0, : int(count[0])].astype(np.float64)
        assert_dets_match(got, r18_outputs[f"{name}__dets"])  # same tolerances as the PyTorch path
    with pytest.raises(ValueError, match=r"r18_raw\.onnx: exported with --raw-input"):
        OrtRunner(out)

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atssdet.compat import DetEvaluator
from atssdet.config import COCO_CLASSES
from atssdet.convert import CheckpointError, save_safetensors
from atssdet.detector import Detector, unflip_boxes
from atssdet.evaluation.coco import detections_to_coco
from atssdet.options import parse_classes
from atssdet.predict import expand_inputs
from atssdet.structures import Detections
from atssdet.visualize import save_detections
from atssdet.zoo import coco_category_ids

# Small test sizes keep the res18 runs fast on a shared CPU.
SHORT, MAX = 160, 256


@pytest.fixture(scope="module")
def detector(r18_model) -> Detector:
    return Detector(r18_model, device="cpu", short_size=SHORT, max_size=MAX)


@pytest.fixture(scope="module")
def cat_result(detector: Detector, r18_outputs) -> Detections:
    (result,) = detector.predict([r18_outputs["cat__image"]])
    return result


def assert_same_detections(a: Detections, b: Detections) -> None:
    # Batched convolutions may round differently in the last float bits (oneDNN picks kernels by
    # batch size); the candidate sets, labels and order must be identical.
    assert a.labels.tolist() == b.labels.tolist()
    torch.testing.assert_close(a.scores, b.scores, atol=2e-6, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=2e-3, rtol=0)


def test_matches_megengine_and_seed_evaluator(
    detector: Detector, cat_result: Detections, r18_outputs
) -> None:
    image = r18_outputs["cat__image"]
    result = cat_result
    # MegEngine's own DetEvaluator.predict(process_inputs(img, 160, 256)) output.
    ref = r18_outputs["small__dets"]
    np.testing.assert_array_equal(result.labels.numpy(), ref[:, 5].astype(np.int64))
    np.testing.assert_allclose(result.scores.numpy(), ref[:, 4], atol=2e-5)
    np.testing.assert_allclose(result.boxes.numpy(), ref[:, :4], atol=5e-3)
    # The seed-compatible evaluator gives the same thing.
    data, im_info = DetEvaluator.process_inputs(image, SHORT, MAX)
    seed = DetEvaluator(detector.runner.model).predict(image=data, im_info=im_info)
    assert isinstance(seed, np.ndarray)
    np.testing.assert_array_equal(result.to_array().numpy()[:, 5], seed[:, 5])
    np.testing.assert_allclose(result.to_array().numpy(), seed, atol=1e-4)
    assert result.image_hw == (612, 459)
    assert result.names[:3] == [COCO_CLASSES[i] for i in result.labels[:3].tolist()]


def test_batch_size_does_not_change_results(detector: Detector, reference_dir: Path, r18_outputs) -> None:
    rng = np.random.default_rng(0)
    # Two padded sizes at 160/256 (portrait 224x160, landscape 160x256) so batches are mixed and split.
    images = [
        str(reference_dir / "cat.jpg"),
        r18_outputs["synth_600x900__image"],
        str(reference_dir / "synth_600x900.png"),
        rng.integers(0, 256, (90, 140, 3), dtype=np.uint8),
        r18_outputs["cat__image"],
    ]
    one = detector.predict(images, batch_size=1)
    four = detector.predict(images, batch_size=4)
    assert len(one) == len(four) == 5
    for a, b in zip(one, four, strict=True):
        assert a.ok and b.ok and a.source == b.source
        assert len(a) > 0
        assert_same_detections(a, b)
    # cat.jpg decoded here and the stored cv2 decoding of it are the same pixels: same detections.
    assert_same_detections(one[0], one[4])
    assert one[0].source.endswith("cat.jpg") and one[4].source == "<array 4>"
    assert_same_detections(one[1], one[2])
    assert one[3].image_hw == (90, 140)
    assert one[4].image is images[4] and one[0].image is None  # arrays kept for plot(), files not


def test_unreadable_inputs_are_reported_and_skipped(detector: Detector, tmp_path: Path, r18_outputs) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    results = detector.predict(
        [broken, r18_outputs["cat__image"], tmp_path / "missing.png", np.zeros((4, 4), np.float32)],
        batch_size=4,
    )
    assert [r.ok for r in results] == [False, True, False, False]
    assert "broken.jpg" in (results[0].error or "") and len(results[0]) == 0
    assert "missing.png" in (results[2].error or "")
    assert "<array 3>" in (results[3].error or "") and "uint8" in (results[3].error or "")
    assert len(results[1]) == 100
    with pytest.raises(
        TypeError, match="input 0: expected a file path or a BGR uint8 numpy array, got Tensor"
    ):
        detector.predict([torch.zeros(3, 8, 8)])


def test_options_classes_agnostic_and_thresholds(
    detector: Detector, cat_result: Detections, r18_outputs
) -> None:
    image = r18_outputs["cat__image"]
    spoon = COCO_CLASSES.index("spoon")
    threshold = float(cat_result.scores.sort().values[-10])  # the 10th best score
    opts = detector.options
    spoon_73 = opts.replace(classes=parse_classes(["spoon", 73], COCO_CLASSES))
    only, agnostic, strict = (
        detector.predict([image], options=spoon_73)[0],
        detector.predict(
            [image], options=opts.replace(class_agnostic=True, nms_threshold=0.5, max_detections=20)
        )[0],
        detector.predict([image], options=opts.replace(score_threshold=threshold))[0],
    )
    assert set(only.labels.tolist()) == {spoon, 73}
    # The filter acts before NMS and the top-100 cut: every spoon/73 box of the full result is kept.
    kept = torch.isin(cat_result.labels, torch.tensor([spoon, 73]))
    full = {tuple(b) for b in cat_result.boxes[kept].tolist()}
    assert full <= {tuple(b) for b in only.boxes.tolist()}
    assert len(agnostic) == 20
    from torchvision.ops import box_iou

    iou = box_iou(agnostic.boxes, agnostic.boxes).fill_diagonal_(0)
    assert iou.max() <= 0.5
    assert len(strict) == 9 and strict.scores.min() > threshold
    with pytest.raises(ValueError, match="'unicorn': unknown class name"):
        parse_classes(["unicorn"], detector.cfg.class_names)
    with pytest.raises(ValueError, match="label id 80 out of range 0..79"):
        detector.predict([image], options=opts.replace(classes=(80,)))


def test_unflip_boxes_hand_computed() -> None:
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 5.0]]])
    out = unflip_boxes(boxes, torch.tensor([[100.0]]))
    assert out.tolist() == [[[70.0, 20.0, 90.0, 40.0], [0.0, 0.0, 100.0, 5.0]]]


def test_flip_tta_is_mirror_symmetric(detector: Detector, cat_result: Detections, r18_outputs) -> None:
    image = r18_outputs["cat__image"]
    mirrored = np.ascontiguousarray(image[:, ::-1])
    tta, tta_mirrored = detector.predict([image, mirrored], options=detector.options.replace(flip_tta=True))
    # TTA pools the plain pass's candidates with the flipped pass's, so its best score can only grow.
    assert tta.scores.max() >= cat_result.scores.max() - 1e-5  # batch of 2 vs 1: last-bit rounding
    # Running TTA on the mirrored image sees the same two views: mirrored results.
    w = image.shape[1]
    assert tta.labels.tolist() == tta_mirrored.labels.tolist()
    torch.testing.assert_close(tta.scores, tta_mirrored.scores, atol=2e-6, rtol=0)
    torch.testing.assert_close(
        tta.boxes, unflip_boxes(tta_mirrored.boxes, torch.tensor(float(w))), atol=2e-3, rtol=0
    )


def test_result_helpers() -> None:
    dets = Detections(
        boxes=torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0]]),
        scores=torch.tensor([0.75, 0.5]),
        labels=torch.tensor([0, 79]),
        class_names=COCO_CLASSES,
        image_hw=(100, 120),
        source="x.jpg",
    )
    assert dets.names == ["person", "toothbrush"]
    d = dets.to_dict()
    assert d["height"] == 100 and d["width"] == 120 and d["error"] is None
    assert d["detections"][0] == {
        "box": [10.0, 20.0, 50.0, 80.0],
        "score": 0.75,
        "label": 0,
        "name": "person",
    }
    coco = detections_to_coco([dets], [7], coco_category_ids(dets.class_names))
    assert coco[0] == {"image_id": 7, "category_id": 1, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.75}
    assert coco[1]["category_id"] == 90  # label 79 is COCO category 90 (ids have gaps)
    assert [c["category_id"] for c in detections_to_coco([dets], [7], list(range(100, 180)))] == [100, 179]
    assert list(coco_category_ids(("a", "b"))) == [1, 2]  # other label sets: label + 1


def test_save_json_is_atomic_round_trip(tmp_path: Path) -> None:
    dets = Detections(
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.5]), torch.tensor([2]), COCO_CLASSES
    )
    path = save_detections(dets, tmp_path / "out" / "r.json")
    assert json.loads(path.read_text()) == dets.to_dict()
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
    with pytest.raises(ValueError, match="unsupported output type"):
        save_detections(dets, tmp_path / "r.txt")


def test_from_checkpoint(tmp_path: Path, r18_model, r18_checkpoint: Path, r18_outputs) -> None:
    st = save_safetensors(r18_model.state_dict(), tmp_path / "r18.safetensors", cfg=r18_model.cfg)
    det = Detector.from_checkpoint(st, device="cpu", short_size=SHORT, max_size=MAX)
    assert det.cfg == r18_model.cfg and det.device == torch.device("cpu")
    (result,) = det.predict([r18_outputs["cat__image"]])
    np.testing.assert_array_equal(result.labels.numpy(), r18_outputs["small__dets"][:, 5].astype(np.int64))
    with pytest.raises(CheckpointError, match="does not say which model"):
        Detector.from_checkpoint(r18_checkpoint)


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    files, failed = expand_inputs([str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "nope.jpg")])
    assert files == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    assert failed == [(str(tmp_path / "nope.jpg"), f"{tmp_path / 'nope.jpg'}: no such file or folder")]


def test_batches_group_same_size_and_bound_waiting(
    detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[int]] = []

    def fake_run(items, options):  # record the schedule instead of running the model
        batches.append([it.index for it in items])
        empty = (torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        return {it.index: Detections(*empty, source=it.source) for it in items}

    monkeypatch.setattr(detector, "_run", fake_run)
    reads: list[int] = []

    def images():
        for i in range(30):
            reads.append(i)
            # At 160/256: 100x150 -> 160x240 (padded 160x256), 200x150 -> 213x160 (padded 224x160).
            yield np.zeros((100 if i in (0, 17) else 200, 150, 3), np.uint8)

    stream = detector.iter_predict(images(), batch_size=2)
    first = next(stream)
    # Image 0 is alone in its size: it must not hold everything behind it until the end.
    assert first.source == "<array 0>" and len(reads) <= 4 * 2 + 1
    rest = list(stream)
    assert [r.source for r in rest] == [f"<array {i}>" for i in range(1, 30)]
    odd = {0, 17}
    for batch in batches:
        assert 1 <= len(batch) <= 2
        assert all(i in odd for i in batch) or not any(i in odd for i in batch)
    assert sorted(i for b in batches for i in b) == list(range(30))

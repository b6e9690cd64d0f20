"""COCO evaluation: statistics against pycocotools run directly, results format, the evaluate() loop, CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from atssdet.evaluation import evaluate
from atssdet.evaluation.coco import STAT_NAMES, coco_stats, detections_to_coco, per_class_ap, run_cocoeval
from atssdet.evaluation.report import metrics_path_for
from atssdet.evaluation.tables import expand_checkpoints, format_stats_table, load_metrics
from atssdet.structures import Detections
from tests.coco_synth import (
    CAT_IDS,
    IMAGES,
    TINY_CFG,
    assert_same_detections,
    crafted_results,
    fake_detector,
    write_split,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_split(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def tiny_model():
    from atssdet.modeling.atss import build_model

    torch.manual_seed(0)
    model = build_model(TINY_CFG).eval()
    with torch.no_grad():  # random heads give few boxes over 0.05; lift the scores so NMS/top-k run
        model.head.cls_score.bias.fill_(0.0)
    return model


def pycocotools_direct(ann_file: Path, results_file: Path) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(str(results_file))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_stats_equal_pycocotools_direct(split, tmp_path):
    """Acceptance 1: all 12 numbers equal COCOeval run directly on the same files (exact)."""
    ann_file, _ = split
    results_file = tmp_path / "crafted.json"
    results_file.write_text(json.dumps(crafted_results()))
    direct = pycocotools_direct(ann_file, results_file)
    ours_from_files = coco_stats(ann_file, results_file)
    ours_from_objects = coco_stats(COCO(str(ann_file)), crafted_results())
    assert list(ours_from_files) == list(STAT_NAMES)
    assert [ours_from_files[n] for n in STAT_NAMES] == direct.tolist()
    assert ours_from_objects == ours_from_files
    # The set exercises every area range and the statistics are not degenerate.
    assert all(0.0 < ours_from_files[n] < 1.0 for n in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1"))


def test_perfect_and_empty_results(split):
    ann_file, _ = split
    gt = COCO(str(ann_file))
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
        if not a["iscrowd"]
    ]
    stats = coco_stats(gt, perfect)
    assert stats == pytest.approx(dict.fromkeys(STAT_NAMES, 1.0), abs=1e-12)
    assert all("id" not in r for r in perfect)  # the caller's list is not modified
    empty = coco_stats(gt, [])
    assert all(empty[n] == 0.0 for n in STAT_NAMES)


def test_per_class_ap_matches_precision_array(split):
    ann_file, _ = split
    ev = run_cocoeval(ann_file, crafted_results())
    table = per_class_ap(ev)
    assert list(table) == ["cat", "dog", "bird"]  # sorted category id order: 3, 7, 12
    # The mean of the per-class APs is the overall AP (every class has gt here).
    assert math.isclose(float(np.mean(list(table.values()))), ev.stats[0], rel_tol=1e-12)


def test_detections_to_coco_maps_labels_and_xywh():
    dets = [
        Detections(
            torch.tensor([[1.0, 2.0, 11.0, 22.5], [0.0, 0.0, 4.0, 4.0]]),
            torch.tensor([0.5, 0.25]),
            torch.tensor([2, 0]),
        ),
        Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)),
    ]
    out = detections_to_coco(dets, [17, 4], CAT_IDS)
    assert out == [
        {"image_id": 17, "category_id": 12, "bbox": [1.0, 2.0, 10.0, 20.5], "score": 0.5},
        {"image_id": 17, "category_id": 3, "bbox": [0.0, 0.0, 4.0, 4.0], "score": 0.25},
    ]
    with pytest.raises(ValueError, match="label 3 outside 0..2"):
        detections_to_coco([Detections(torch.zeros(1, 4), torch.ones(1), torch.tensor([3]))], [1], CAT_IDS)


def test_evaluate_fake_detector_writes_loadable_results(split, tmp_path):
    """Acceptance 4 (eval half): the results JSON loads in COCO.loadRes unchanged; stats match a direct run."""
    ann_file, image_dir = split
    out = tmp_path / "run" / "fake.results.json"
    report = evaluate(fake_detector, ann_file, image_dir, batch_size=2, out=out, progress=False)
    assert report.num_images == len(IMAGES) and report.failed_images == []
    assert (
        Path(report.results_path) == out
        and Path(report.metrics_path) == tmp_path / "run" / "fake.metrics.json"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        dt = COCO(str(ann_file)).loadRes(str(out))
    expected_count = sum(len([o for o in objects if not o[5]]) + 1 for *_, objects in IMAGES)
    assert len(dt.getAnnIds()) == report.num_detections == expected_count
    assert sorted(dt.getImgIds()) == sorted(i[1] for i in IMAGES)
    assert [report.stats[n] for n in STAT_NAMES] == pycocotools_direct(ann_file, out).tolist()
    metrics = json.loads(Path(report.metrics_path).read_text())
    assert metrics["stats"] == report.stats and metrics["num_images"] == len(IMAGES)
    assert load_metrics(out, gt=ann_file) == report.stats == load_metrics(report.metrics_path)


def test_unreadable_images_reported_and_skipped(tmp_path, capsys):
    ann_file, image_dir = write_split(tmp_path)
    (image_dir / "b.png").write_bytes(b"not an image")
    (image_dir / "z.png").unlink()
    data = json.loads(ann_file.read_text())
    data["images"][1]["height"] = 151  # 'street view.jpg' is 150 px high
    ann_file.write_text(json.dumps(data))
    report = evaluate(fake_detector, ann_file, image_dir, batch_size=3, progress=False)
    assert report.num_images == len(IMAGES) - 2
    assert len(report.failed_images) == 2
    assert any("b.png" in f for f in report.failed_images) and any("z.png" in f for f in report.failed_images)
    err = capsys.readouterr().err
    assert "b.png" in err and "z.png" in err
    assert "street view.jpg: the annotation file says 151x120 but the image is 150x120" in err
    # Statistics cover the images that were evaluated: same as scoring those images directly.
    kept = [i[1] for i in IMAGES if i[0] not in ("b.png", "z.png")]
    results = [
        r for r in detections_to_coco(fake_detector(_read_all(image_dir, kept, ann_file)), kept, CAT_IDS)
    ]
    assert report.stats == coco_stats(ann_file, results, image_ids=kept)


def _read_all(image_dir: Path, ids: list[int], ann_file: Path) -> list[np.ndarray]:
    from atssdet.data.image_io import read_image

    gt = COCO(str(ann_file))
    return [read_image(image_dir / gt.imgs[i]["file_name"]) for i in ids]


def test_evaluate_model_equals_det_evaluator_predict(split, tiny_model, tmp_path):
    """With an ATSS model and batch size 1, results are exactly compat.DetEvaluator.predict's detections."""
    from atssdet.compat import DetEvaluator
    from atssdet.data.image_io import read_image

    ann_file, image_dir = split
    report = evaluate(tiny_model, ann_file, image_dir, batch_size=1, out=tmp_path / "m.json", progress=False)
    results = json.loads((tmp_path / "m.json").read_text())
    evaluator = DetEvaluator(tiny_model)
    expected = []
    for file_name, image_id, *_ in sorted(IMAGES, key=lambda i: i[1]):
        data, im_info = DetEvaluator.process_inputs(read_image(image_dir / file_name), 96, 160)
        dets = evaluator.predict(image=data, im_info=im_info)
        assert isinstance(dets, np.ndarray)
        d = torch.from_numpy(dets)
        expected += detections_to_coco(
            [Detections(d[:, :4].float(), d[:, 4].float(), d[:, 5].long())], [image_id], CAT_IDS
        )
    assert len(results) > 50 and results == expected
    assert report.num_detections == len(results)
    # Batch composition does not change results: images batch only with same-padded-size images
    # ('street view.jpg' and 'y.jpeg' both pad to 128x96 and share a batch here); only the float
    # rounding of batched conv kernels differs (~1e-5 px). Zero-padding to a larger image would not.
    # A model in training mode is evaluated in eval mode and handed back in training mode.
    tiny_model.train()
    batched = evaluate(tiny_model, ann_file, image_dir, batch_size=3, out=tmp_path / "b.json", progress=False)
    assert tiny_model.training
    tiny_model.eval()
    batched_results = json.loads((tmp_path / "b.json").read_text())
    assert_same_detections(batched_results, results)  # equal up to float rounding of batched kernels
    assert batched.stats == pytest.approx(report.stats, abs=1e-9)


def test_model_runner_groups_by_padded_size(tiny_model):
    from atssdet.batching import padded_size
    from atssdet.evaluation.loop import ModelRunner

    runner = ModelRunner(tiny_model, device=torch.device("cpu"))
    keys = {name: padded_size(*runner.resized_hw(h, w)) for name, _, h, w, _ in IMAGES}
    assert keys == {
        "b.png": (96, 128),
        "street view.jpg": (128, 96),  # 150x120 -> 120x96
        "c/a.png": (96, 160),  # 80x160: short side 96 would make the long side 192 > 160
        "z.png": (96, 96),
        "y.jpeg": (128, 96),  # 120x100 -> 115x96
    }


def test_evaluate_rejects_class_count_mismatch(split, tiny_model, tmp_path):
    ann_file, image_dir = split
    data = json.loads(ann_file.read_text())
    data["categories"] = data["categories"][:2]
    kept = {c["id"] for c in data["categories"]}  # a valid file: no annotation of the dropped category
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in kept]
    bad = tmp_path / "two_classes.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="2 categories but the model predicts 3 classes"):
        evaluate(tiny_model, bad, image_dir, progress=False)


def test_expand_checkpoints(tmp_path):
    for e in (1, 2, 3, 10):
        (tmp_path / f"epoch_{e}.safetensors").write_bytes(b"x")
    pattern = str(tmp_path / "epoch_{epoch}.safetensors")
    assert [p.name for p in expand_checkpoints([pattern], start_epoch=2, end_epoch=3)] == [
        "epoch_2.safetensors",
        "epoch_3.safetensors",
    ]
    globbed = expand_checkpoints([str(tmp_path / "epoch_*.safetensors")])
    assert [p.name for p in globbed] == [f"epoch_{e}.safetensors" for e in (1, 2, 3, 10)]  # natural order
    with pytest.raises(FileNotFoundError, match="epoch_4.safetensors"):
        expand_checkpoints([pattern], start_epoch=3, end_epoch=4)
    with pytest.raises(ValueError, match="needs --start-epoch"):
        expand_checkpoints([pattern])


def test_metrics_path_and_table():
    assert metrics_path_for("a/x.results.json") == Path("a/x.metrics.json")
    assert metrics_path_for("a/x.json") == Path("a/x.metrics.json")
    stats = dict.fromkeys(STAT_NAMES, 0.5)
    stats["APs"] = -1.0
    table = format_stats_table([("e1", stats), ("e2", dict.fromkeys(STAT_NAMES, 0.25))]).splitlines()
    assert table[0] == "| name | " + " | ".join(STAT_NAMES) + " |"
    assert table[2] == "| e1 | 50.0 | 50.0 | 50.0 | - | " + " | ".join(["50.0"] * 8) + " |"
    assert table[3] == "| e2 | " + " | ".join(["25.0"] * 12) + " |"


def test_cli_eval_two_checkpoints_and_table(split, tiny_model, tmp_path, capsys):
    """`eval` over an {epoch} range writes results+metrics per checkpoint; `table` compares them."""
    from atssdet.cli import main
    from atssdet.convert import save_safetensors

    ann_file, image_dir = split
    for epoch in (1, 2):
        save_safetensors(tiny_model.state_dict(), tmp_path / f"epoch_{epoch}.safetensors", cfg=TINY_CFG)
    code = main(
        ["eval", "--weights", str(tmp_path / "epoch_{epoch}.safetensors"), "-se", "1", "-ee", "2",
         "--data", str(ann_file), "--images", str(image_dir), "--out", str(tmp_path / "out" / "{name}.results.json"),
         "--batch-size", "2", "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for epoch in (1, 2):
        results = tmp_path / "out" / f"epoch_{epoch}.results.json"
        metrics = json.loads((tmp_path / "out" / f"epoch_{epoch}.metrics.json").read_text())
        assert metrics["stats"] == coco_stats(ann_file, results)
        assert metrics["checkpoint"].endswith(f"epoch_{epoch}.safetensors")
    assert "AR100 =" in out and "| class | AP |" in out and "| epoch_1 |" in out and "| epoch_2 |" in out

    files = [str(tmp_path / "out" / f"epoch_{e}.metrics.json") for e in (1, 2)]
    assert main(["table", *files]) == 0
    table = capsys.readouterr().out.splitlines()
    assert (
        table[0].startswith("| name | AP | AP50") and table[2].startswith("| epoch_1 |") and len(table) == 4
    )


def test_cli_eval_errors(split, tmp_path, capsys):
    from atssdet.cli import main

    ann_file, image_dir = split
    (tmp_path / "w.pkl").write_bytes(b"x")
    assert (
        main(
            [
                "eval",
                "--weights",
                str(tmp_path / "w.pkl"),
                "--data",
                str(ann_file),
                "--images",
                str(image_dir),
            ]
        )
        == 2
    )
    assert "carries no config; name the model with --model" in capsys.readouterr().err
    assert main(["table", str(tmp_path / "missing.metrics.json")]) == 2
    assert "missing.metrics.json: no such file" in capsys.readouterr().err


def test_cli_eval_onnx_export_scores_like_pytorch(split, tiny_model, tmp_path, capsys):
    """`eval --weights m.onnx` runs the exported file in ONNX Runtime through the same pipeline:
    the same 12 statistics as the PyTorch model (detections equal up to float rounding)."""
    from atssdet.cli import main
    from atssdet.export import export_onnx

    ann_file, image_dir = split
    onnx_path = export_onnx(tiny_model, tmp_path / "tiny.onnx", example_hw=(75, 90))
    reference = evaluate(tiny_model, ann_file, image_dir, out=tmp_path / "torch.json", progress=False)
    code = main(
        ["eval", "--weights", str(onnx_path), "--data", str(ann_file), "--images", str(image_dir),
         "--out", str(tmp_path / "onnx.json"), "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "onnx.metrics.json").read_text())
    assert metrics["checkpoint"].endswith("tiny.onnx")
    assert metrics["stats"] == pytest.approx(reference.stats, abs=1e-6)
    assert_same_detections(
        json.loads((tmp_path / "onnx.json").read_text()), json.loads((tmp_path / "torch.json").read_text())
    )
    assert main(["eval", "--weights", str(onnx_path), "--data", str(ann_file), "--images", str(image_dir),
                 "--set", "test_nms=0.5"]) == 2  # fmt: skip
    assert "does not apply to an ONNX file" in capsys.readouterr().err

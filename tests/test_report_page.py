"""``eval --report``'s HTML page opened in headless Chromium (the serving test's launch code): every
picture loads, the tables are there; the ``eval --analysis`` files; and both from the CLI on a YOLO split."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from atssdet.evaluation import evaluate
from atssdet.evaluation.coco import read_ground_truth
from atssdet.evaluation.extras import write_extras
from tests import coco_synth

# The serving test's browser launch (it skips, with the reason, without playwright or chromium).
from tests.test_serve_browser import CHROMIUM, CHROMIUM_ARGS, playwright_sync


@pytest.fixture(scope="module")
def page_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page of the fake detector (shifted boxes + one false positive per image) on the 5-image split."""
    root = tmp_path_factory.mktemp("report")
    ann, images = coco_synth.write_split(root)
    report = evaluate(coco_synth.fake_detector, ann, images, out=root / "r.results.json", progress=False,
                      num_workers=0)  # fmt: skip
    page = root / "site" / "index.html"
    write_extras(report, read_ground_truth(ann), images, analysis_dir=root / "analysis", report_path=page,
                 inputs=[ann])  # fmt: skip
    return page


def test_report_page_loads_every_picture_in_chromium(page_file, tmp_path):
    shots = Path(os.environ.get("ATSSDET_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    text = page_file.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.id || i.className, i.complete, i.naturalWidth])"
            )
            assert len(images) == 3 + 5, images  # curves, matrix, TIDE + the 5 images with errors
            assert all(done and width > 0 for _, done, width in images), images
            assert [r for r in requests if not r.startswith(("file:", "data:"))] == []
            rows = page.locator("table").first.locator("tr").count()
            assert rows == 1 + 12  # the 12 COCO statistics
            assert page.locator("table").nth(1).locator("tr").count() == 1 + 3  # per-class AP
            assert "TIDE" in page.inner_text("body")
            page.screenshot(path=str(shots / "report_page.png"), full_page=True)
        finally:
            browser.close()


def test_analysis_files_are_written_and_consistent(page_file):
    root = page_file.parent.parent
    summary = json.loads((root / "analysis" / "analysis.json").read_text())
    with open(root / "analysis" / "confusion_matrix.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == ["cat", "dog", "bird", "background"] and len(table) == 5
    assert [[int(v) for v in row[1:]] for row in table[1:]] == summary["confusion"]["matrix"]
    assert sorted(p.name for p in (root / "analysis" / "pr_curves").iterdir()) == [
        "000_cat.png", "001_dog.png", "002_bird.png"
    ]  # fmt: skip
    # the fake detector adds one false positive per image, at score 0.65: TIDE counts 5 non-TP detections
    tide = summary["tide"]["counts"]
    assert tide["Bkg"] + tide["Both"] + tide["Cls"] + tide["Loc"] + tide["Dupe"] >= 5


def test_eval_cli_writes_analysis_and_page_of_a_yolo_split(tmp_path, capsys):
    """``eval --data YOLO --analysis DIR --report PAGE`` with a small random-weight model; with several
    checkpoints the page path needs ``{name}`` (refused before any model loads)."""
    import torch

    from atssdet.cli import main
    from atssdet.data.formats.convert import convert_dataset
    from atssdet.modeling.atss import build_model
    from atssdet.training.checkpoint import save_final_weights

    ann, images = coco_synth.write_split(tmp_path / "coco")
    convert_dataset(ann, "yolo", tmp_path / "yolo", images=str(images))
    torch.manual_seed(0)
    weights = save_final_weights(
        build_model(coco_synth.TINY_CFG), tmp_path / "m.safetensors", coco_synth.TINY_CFG
    )
    code = main([
        "eval", "--weights", str(weights), "--data", str(tmp_path / "yolo"), "--split", "train",
        "--out", str(tmp_path / "ev" / "{name}.results.json"), "--analysis", str(tmp_path / "an"),
        "--report", str(tmp_path / "ev" / "index.html"), "--device", "cpu", "--no-progress", "--workers", "0",
        "--set", "test_max_boxes_per_image=20",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "an" / "confusion_matrix.csv").is_file()
    assert len(list((tmp_path / "an" / "pr_curves").glob("*.png"))) == 3
    assert "<h2>TIDE error breakdown</h2>" in (tmp_path / "ev" / "index.html").read_text()
    capsys.readouterr()
    other = tmp_path / "m2.safetensors"
    other.write_bytes(weights.read_bytes())
    assert main(["eval", "--weights", str(weights), str(other), "--data", str(tmp_path / "yolo"),
                 "--report", str(tmp_path / "one.html")]) == 2  # fmt: skip
    assert "several checkpoints are evaluated; put {name} in the path" in capsys.readouterr().err

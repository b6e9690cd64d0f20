"""Regenerate docs/report_page.jpg: the ``eval --report`` page of crafted detections, in headless Chromium.

The detections are the synthetic validation split's boxes, jittered, with swapped classes, duplicates,
background boxes and misses (no model is trained): ``python tools/report_screenshot.py`` from the
repository root (needs chromium and playwright, as tests/test_report_page.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atssdet.data.synth import generate_synthetic_dataset  # noqa: E402
from atssdet.evaluation.coco import per_class_ap, read_ground_truth, run_cocoeval, stats_from_cocoeval  # noqa: E402
from atssdet.evaluation.extras import write_extras  # noqa: E402
from atssdet.evaluation.report import EvalReport  # noqa: E402


def crafted_results(gt, rng: np.random.Generator) -> list[dict]:
    cats, t, out = sorted(gt.categories), gt.annotations, []
    for i in range(len(t.image_ids)):
        x, y, w, h = t.boxes_xywh[i]
        image, cat, u = int(t.image_ids[i]), int(t.category_ids[i]), rng.random()
        if u < 0.12:
            continue  # a miss
        if u < 0.22:
            cat = int(rng.choice(cats))  # perhaps the wrong class
        j = rng.normal(0, 1.5 if rng.random() < 0.8 else 9, 4)
        box = [x + j[0], y + j[1], max(w + j[2], 3), max(h + j[3], 3)]
        out.append(
            {"image_id": image, "category_id": cat, "bbox": box, "score": float(rng.uniform(0.35, 0.99))}
        )
        if rng.random() < 0.08:  # a duplicate
            out.append(
                {
                    "image_id": image,
                    "category_id": cat,
                    "bbox": [x + 2, y, w, h],
                    "score": float(rng.uniform(0.3, 0.6)),
                }
            )
    for image, rec in gt.images.items():
        for _ in range(int(rng.integers(0, 3))):  # background boxes
            xy = [float(rng.uniform(0, rec.width - 30)), float(rng.uniform(0, rec.height - 30))]
            out.append({"image_id": image, "category_id": int(rng.choice(cats)), "bbox": [*xy, 25.0, 25.0],
                        "score": float(rng.uniform(0.05, 0.7))})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "report_page.jpg")
    args = parser.parse_args()
    from tests.test_serve_browser import CHROMIUM, CHROMIUM_ARGS, playwright_sync

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ds = generate_synthetic_dataset(root / "data", num_train=1, num_val=40, image_size=(160, 224),
                                        progress=False, log=lambda m: None)  # fmt: skip
        gt = read_ground_truth(ds.val_ann)
        results = crafted_results(gt, np.random.default_rng(1))
        (root / "r.results.json").write_text(json.dumps(results))
        ev = run_cocoeval(gt, results)
        report = EvalReport(stats_from_cocoeval(ev), per_class_ap(ev), len(gt.images), len(results),
                            results_path=str(root / "r.results.json"))  # fmt: skip
        page_path = root / "site" / "index.html"
        write_extras(report, gt, ds.val_images, analysis_dir=None, report_path=page_path,
                     title="crafted detections on the synthetic val split")  # fmt: skip
        with playwright_sync.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(root / "shot.png"), full_page=True)
            browser.close()
        shot = cv2.imread(str(root / "shot.png"))
        small = cv2.resize(shot, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(args.out), small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

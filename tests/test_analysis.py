"""TIDE error breakdown and confusion matrix (atssdet.evaluation.analysis): hand-computed cases and tidecv."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from atssdet.data.coco_schema import validate_coco
from atssdet.evaluation.analysis import ERROR_TYPES, confusion_matrix, tide_errors

Box = tuple[float, float, float, float]


def _gt(images: dict[int, list[tuple[int, Box, int]]], num_classes: int = 3, size: int = 200) -> Any:
    """A validated split: image id -> [(category id, xywh, iscrowd)]."""
    anns = [
        {"id": k, "image_id": i, "category_id": c, "bbox": list(b), "iscrowd": crowd}
        for k, (i, (c, b, crowd)) in enumerate(((i, o) for i, objs in images.items() for o in objs), start=1)
    ]
    doc = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": size, "width": size} for i in images],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, num_classes + 1)],
        "annotations": anns,
    }
    return validate_coco(doc, "crafted").raise_if_fatal()


def _det(image_id: int, cat: int, box: Box, score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


def test_tide_hand_computed_duplicate_and_miss():
    """One class, 2 boxes; a true positive (0.9) and its duplicate (0.8); box 2 missed.

    AP50 = 51/101 bars of precision 1 (recall reaches 0.5 only) = 50.495; removing the duplicate
    changes nothing; dropping the missed box makes recall 1 at precision 1: +49.505."""
    gt = _gt({1: [(1, (10, 10, 50, 50), 0), (1, (100, 100, 40, 40), 0)]}, num_classes=1)
    results = [_det(1, 1, (10, 10, 50, 50), 0.9), _det(1, 1, (11, 10, 50, 50), 0.8)]
    report = tide_errors(gt, results)
    assert report.ap == pytest.approx(100 * 51 / 101)
    assert report.counts == {"Cls": 0, "Loc": 0, "Both": 0, "Dupe": 1, "Bkg": 0, "Miss": 1}
    assert report.delta_ap["Dupe"] == pytest.approx(0.0)
    assert report.delta_ap["Miss"] == pytest.approx(100 - 100 * 51 / 101)


def test_tide_hand_computed_class_localisation_background():
    """Class 1 boxes A and C, class 2 box B. Detections: 0.9 class 2 on A (Cls), 0.8 class 1 on C
    shifted to IoU 1/3 (Loc), 0.7 class 2 on B (true positive), 0.6 class 2 far from all (Bkg).

    Class 1: one false positive, 2 boxes: AP 0. Class 2: 0.9 F, 0.7 T, 0.6 F -> precision 1/2 up to
    recall 1: AP 50. mAP 25.
    Fix Cls: the 0.9 is class 1's true positive: class 1 (0.9 T, 0.8 F; 2 boxes) 51/101 * 100,
    class 2 (0.7 T, 0.6 F) 100: mAP 75.25 (+50.25). Fix Loc: class 1 (0.8 T) 51/101 * 100, class 2 50:
    +25.25. Fix Bkg: the 0.6 F comes after recall 1: +0."""
    a, b, c = (10, 10, 60, 60), (120, 120, 50, 50), (10, 120, 60, 60)
    gt = _gt({1: [(1, a, 0), (2, b, 0), (1, c, 0)]}, num_classes=2)
    results = [
        _det(1, 2, a, 0.9),
        _det(1, 1, (40, 120, 60, 60), 0.8),  # IoU with C: 30*60 / (2*3600 - 1800) = 1/3
        _det(1, 2, b, 0.7),
        _det(1, 2, (150, 10, 20, 20), 0.6),
    ]
    report = tide_errors(gt, results)
    assert report.counts == {"Cls": 1, "Loc": 1, "Both": 0, "Dupe": 0, "Bkg": 1, "Miss": 0}
    half = 100 * 51 / 101
    assert report.ap == pytest.approx(25.0)
    assert report.delta_ap["Cls"] == pytest.approx((half + 100) / 2 - 25)
    assert report.delta_ap["Loc"] == pytest.approx((half + 50) / 2 - 25)
    assert report.delta_ap["Bkg"] == pytest.approx(0.0)


def _random_case(seed: int, num_images: int = 25) -> tuple[Any, list[dict[str, Any]], dict[int, list[Any]]]:
    """Boxes of 3 classes (some crowd) and detections of every kind: exact, jittered, wrong class,
    duplicates, background, missing, overlapping crowd."""
    rng = np.random.default_rng(seed)
    images: dict[int, list[tuple[int, Box, int]]] = {}
    results = []
    for i in range(1, num_images + 1):
        objs = []
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 140, 2)
            w, h = rng.uniform(10, 60, 2)
            objs.append(
                (int(rng.integers(1, 4)), (float(x), float(y), float(w), float(h)), int(rng.random() < 0.1))
            )
        images[i] = objs
        for c, (x, y, w, h), _ in objs:
            kind = rng.random()
            if kind < 0.15:
                continue  # missed
            cat = c if rng.random() > 0.2 else int(rng.integers(1, 4))
            jitter = rng.normal(0, [2, 2, 2, 2] if rng.random() < 0.6 else [15, 15, 10, 10])
            results.append(_det(i, cat, (x + jitter[0], y + jitter[1], max(w + jitter[2], 2), max(h + jitter[3], 2)),
                                float(rng.random())))  # fmt: skip
            if rng.random() < 0.2:
                results.append(_det(i, c, (x + 1, y, w, h), float(rng.random())))  # a duplicate
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 180, 2)
            results.append(
                _det(i, int(rng.integers(1, 4)), (float(x), float(y), 15.0, 15.0), float(rng.random()))
            )
    return _gt(images), results, images


def _tidecv_breakdown(
    images: dict[int, list[Any]], results: list[dict[str, Any]]
) -> tuple[float, dict[str, float]]:
    tidecv = pytest.importorskip(
        "tidecv", reason="tidecv not installed (pip install --no-deps tidecv appdirs seaborn pandas)"
    )
    gt = tidecv.Data("gt")
    for i, objs in images.items():
        gt.add_image(i, f"{i}.png")
        for c, box, crowd in objs:
            if crowd:
                gt.add_ignore_region(i, c, list(box))
            else:
                gt.add_ground_truth(i, c, list(box))
    preds = tidecv.Data("preds")
    for r in results:
        preds.add_detection(r["image_id"], r["category_id"], r["score"], r["bbox"])
    tide = tidecv.TIDE()
    run = tide.evaluate(gt, preds, mode=tidecv.TIDE.BOX)
    errors = tide.get_main_errors()["preds"]
    return run.ap, errors


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tide_agrees_with_tidecv_on_crafted_result_sets(seed):
    gt, results, images = _random_case(seed)
    ap, errors = _tidecv_breakdown(images, results)
    report = tide_errors(gt, results)
    assert report.ap == pytest.approx(ap, abs=0.1)
    for kind in ERROR_TYPES:
        assert report.delta_ap[kind] == pytest.approx(errors[kind], abs=0.1), kind
    assert sum(report.counts.values()) > 10 and sum(v > 0 for v in report.delta_ap.values()) >= 3


def test_confusion_matrix_equals_a_hand_count():
    """Rows true class (+ background), columns predicted (+ background), at IoU 0.5 and score >= 0.3."""
    a, b, c = (10, 10, 40, 40), (100, 10, 40, 40), (10, 100, 40, 40)
    gt = _gt({1: [(1, a, 0), (2, b, 0), (3, c, 0)], 2: [(1, a, 0), (1, (150, 150, 40, 40), 1)]})
    results = [
        _det(1, 1, a, 0.9),  # class 1 -> 1
        _det(1, 3, b, 0.8),  # class 2 predicted 3
        _det(1, 2, (150, 10, 30, 30), 0.7),  # background predicted 2
        _det(1, 3, c, 0.2),  # below the score threshold: class 3 missed
        _det(2, 1, (12, 10, 40, 40), 0.9),  # class 1 -> 1
        _det(2, 1, (10, 12, 40, 40), 0.8),  # the same box again: background predicted 1
        _det(2, 2, (151, 150, 40, 40), 0.9),  # inside a crowd box: not counted
    ]
    m = confusion_matrix(gt, results, score_threshold=0.3)
    want = np.zeros((4, 4), np.int64)
    want[0, 0] = 2
    want[1, 2] = 1
    want[2, 3] = 1
    want[3, 1] = 1
    want[3, 0] = 1
    np.testing.assert_array_equal(m, want)

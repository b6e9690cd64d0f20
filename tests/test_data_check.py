"""`atssdet data check` / `check_dataset`: one of each problem is reported, with counts and ids."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from atssdet.cli import main
from atssdet.data.check import PROBLEM_KINDS, DatasetCheckError, check_dataset
from tests.conftest import run_cli


def _png(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))


def _ann(ann_id: int | None, image_id, cat, bbox, crowd=0) -> dict:
    out = {"image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd}
    if ann_id is not None:
        out["id"] = ann_id
    return out


def _write_everything_wrong(root: Path) -> tuple[Path, Path]:
    """A split with exactly one instance of every problem kind that a loadable file can have."""
    images_dir = root / "images"
    _png(images_dir / "ok.png", 20, 30)
    _png(images_dir / "crowd.png", 20, 30)
    _png(images_dir / "empty.png", 20, 30)
    _png(images_dir / "boxes.png", 20, 30)
    _png(images_dir / "size.png", 10, 10)  # JSON says 20x30
    _png(images_dir / "allbad.png", 20, 30)
    _png(root / "outside.png", 20, 30)
    (images_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    img = lambda i, name: {"id": i, "file_name": name, "height": 20, "width": 30}  # noqa: E731
    data = {
        "categories": [
            {"id": 1, "name": "cat"},
            {"id": 2, "name": "dog"},  # unused
            {"id": 1, "name": "cat again"},  # duplicate category id
            {"id": "3", "name": "bad"},  # malformed category
        ],
        "images": [
            img(1, "ok.png"),
            img(2, "missing.png"),
            img(3, "corrupt.png"),
            img(4, "size.png"),
            img(5, "crowd.png"),
            img(6, "empty.png"),
            img(1, "dup-id.png"),  # duplicate image id
            {"id": 7, "file_name": "x.png", "width": 30},  # malformed: no height
            img(8, "boxes.png"),
            img(9, "ok.png"),  # duplicate file name
            img(10, "allbad.png"),
            img(11, "../outside.png"),  # outside the image folder
        ],
        "annotations": [
            _ann(1, 1, 1, [1, 2, 10, 10]),
            _ann(2, 2, 1, [1, 2, 10, 10]),
            _ann(3, 3, 1, [1, 2, 10, 10]),
            _ann(4, 4, 1, [1, 2, 5, 5]),
            _ann(5, 5, 1, [1, 2, 10, 10], crowd=1),
            _ann(6, 8, 1, [1, 2, 0, 10]),  # degenerate
            _ann(7, 8, 1, [1, float("nan"), 10, 10]),  # NaN
            _ann(8, 8, 1, [100, 2, 10, 10]),  # entirely outside
            _ann(9, 8, 1, [25, 2, 10, 10]),  # partly outside
            _ann(10, 8, 99, [1, 2, 10, 10]),  # unknown category
            _ann(11, 77, 1, [1, 2, 10, 10]),  # unknown image
            _ann(1, 8, 1, [2, 2, 10, 10]),  # duplicate annotation id
            _ann(None, 8, 1, [3, 2, 10, 10]),  # no annotation id
            {"id": 14, "image_id": 8, "category_id": 1, "bbox": [1, 2, 3]},  # malformed bbox
            _ann(15, 9, 1, [1, 2, 10, 10]),
            _ann(16, 10, 1, [1, 2, -4, 10]),  # the only box of image 10 is degenerate
            _ann(17, 11, 1, [1, 2, 10, 10]),
        ],
    }
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))  # json writes NaN as the NaN literal, which json.loads reads
    return ann, images_dir


EXPECTED = {
    "malformed_category": ["categories[3]"],
    "duplicate_category_id": ["category id 1"],
    "malformed_image": ["images[7]"],
    "duplicate_image_id": ["image id 1"],
    "malformed_annotation": ["annotation id 14"],
    "nonfinite_box": ["annotation id 7"],
    "unknown_image_id": ["annotation id 11"],
    "unknown_category_id": ["annotation id 10"],
    "missing_file": ["image id 2"],
    "unreadable_image": ["image id 3"],
    "size_mismatch": ["image id 4"],
    "degenerate_box": ["annotation id 6", "annotation id 16"],
    "box_outside_image": ["annotation id 8"],
    "box_partly_outside": ["annotation id 9"],
    "crowd_only_image": ["image id 5"],
    "empty_image": ["image id 6"],
    "no_valid_box_image": ["image id 10"],
    "duplicate_annotation_id": ["annotation id 1"],
    "missing_annotation_id": ["annotations[12]"],
    "duplicate_file_name": ["'ok.png'"],
    "file_outside_image_dir": ["image id 11"],
    "unused_category": ["category id 2"],
}


def test_one_of_each_problem_is_reported(tmp_path):
    ann, images = _write_everything_wrong(tmp_path)
    report = check_dataset(ann, images, num_workers=2)
    found = {p.code: p for p in report.problems}
    assert set(found) == set(EXPECTED), sorted(set(found) ^ set(EXPECTED))
    for code, ids in EXPECTED.items():
        p = found[code]
        assert p.count == len(ids), (code, p)
        assert p.severity == PROBLEM_KINDS[code][0]
        for example, want in zip(p.examples, ids, strict=True):
            assert example.startswith(want), (code, example, want)
    assert "not this" not in found["unreadable_image"].examples[0]
    assert "JSON says 20x30" in found["size_mismatch"].examples[0]
    assert report.num_images == 10 and report.num_annotations == 17 and report.num_categories == 2
    # valid boxes: ann 1, 9 (partly outside, kept), 12, 13, 15, 17, and 2, 3, 4 (image problems are per file)
    assert report.class_counts == {1: ("cat", 9), 2: ("dog", 0)}
    assert not report.ok
    assert {p.code for p in report.fatal} == {c for c in EXPECTED if PROBLEM_KINDS[c][0] == "fatal"}
    with pytest.raises(DatasetCheckError, match="missing_file") as info:
        report.raise_if_fatal()
    assert info.value.report is report
    text = report.format()
    for code in EXPECTED:
        assert code in text


def test_no_images_only_checks_existence(tmp_path):
    ann, images = _write_everything_wrong(tmp_path)
    report = check_dataset(ann, images, read_images=False)
    codes = {p.code for p in report.problems}
    assert "missing_file" in codes
    assert not codes & {"unreadable_image", "size_mismatch"}
    assert report.images_read == 0


def test_clean_split_is_ok(tmp_path):
    _png(tmp_path / "a.png", 20, 30)
    ann = tmp_path / "a.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
                "categories": [{"id": 1, "name": "x"}],
                "annotations": [_ann(1, 1, 1, [0, 0, 30, 20])],
            }
        )
    )
    report = check_dataset(ann, tmp_path)
    assert report.ok and report.problems == [] and report.images_read == 1
    report.raise_if_fatal()


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        ("[1, 2]", "bad_structure", "expected a JSON object, got list"),
        ('{"images": []}', "bad_structure", "missing top-level key 'categories'"),
        ('{"images": {}, "categories": []}', "bad_structure", "'images' must be a list, got dict"),
        (
            '{"images": [], "categories": [], "annotations": 3}',
            "bad_structure",
            "'annotations' must be a list",
        ),
        ('{"images": [', "unreadable_annotation_file", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "unreadable_annotation_file", "not valid JSON"),
    ],
)
def test_malformed_structure_is_reported_not_raised(tmp_path, content, code, message):
    ann = tmp_path / "bad.json"
    ann.write_bytes(content if isinstance(content, bytes) else content.encode())
    report = check_dataset(ann, tmp_path)
    p = report.problem(code)
    assert p is not None and p.severity == "fatal", report.problems
    assert any(message in e for e in p.examples), p.examples


def test_missing_annotation_file_and_folder(tmp_path):
    report = check_dataset(tmp_path / "nope.json", tmp_path / "nodir")
    p = report.problem("unreadable_annotation_file")
    assert p is not None and "nope.json" in p.examples[0]
    ann = tmp_path / "a.json"
    ann.write_text('{"images": [], "categories": [{"id": 1, "name": "x"}]}')
    report = check_dataset(ann, tmp_path / "nodir")
    assert [p.code for p in report.fatal] == ["image_folder_missing"]
    assert report.problem("no_annotations_key") is not None


def test_cli_reports_all_and_exits_nonzero(tmp_path):
    ann, images = _write_everything_wrong(tmp_path)
    out_json = tmp_path / "out" / "report.json"
    res = run_cli(
        "data", "check", str(ann), "--images", str(images), "--json", str(out_json),
        "--max-examples", "1", "--no-progress", timeout=120,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    for code in EXPECTED:
        assert code in res.stdout
    assert "FAILED" in res.stdout
    saved = json.loads(out_json.read_text())
    assert saved["ok"] is False
    assert {p["code"] for p in saved["problems"]} == set(EXPECTED)
    assert all(len(p["examples"]) <= 1 for p in saved["problems"])
    degenerate = next(p for p in saved["problems"] if p["code"] == "degenerate_box")
    assert degenerate["count"] == 2


def test_cli_clean_split_exits_zero(tmp_path, capsys):
    _png(tmp_path / "im" / "a.png", 8, 8)
    ann = tmp_path / "a.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
                "categories": [{"id": 1, "name": "x"}],
                "annotations": [_ann(1, 1, 1, [0, 0, 4, 4])],
            }
        )
    )
    assert main(["data", "check", str(ann), "--images", str(tmp_path / "im"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "OK: 0 fatal" in out
    assert "x 1" in out

"""One COCO schema: the reader, `data check` (function and CLI) and eval's ground truth give one verdict.

A table of edge-case annotation files; for each, every consumer accepts it or every consumer refuses
it, and a refusal names the file and the problem (the reader and eval raise the very same message).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from atssdet.cli import main
from atssdet.data.check import check_dataset
from atssdet.data.coco import COCODetection
from atssdet.data.coco_records import DatasetError
from atssdet.data.coco_schema import read_coco_file
from atssdet.evaluation.coco import coco_stats, load_ground_truth
from tests.conftest import REPO_ROOT


def _valid() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 24, "width": 32},
            {"id": 2, "file_name": "b.png", "height": 24, "width": 32},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12], "iscrowd": 0, "area": 120},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [3, 4, 8, 8], "iscrowd": 0, "area": 64},
        ],
    }


def _doc(change: Callable[[dict[str, Any]], Any]) -> bytes:
    doc = _valid()
    change(doc)
    return json.dumps(doc).encode()  # json writes NaN as the NaN literal, which json.loads reads


def _set(section: str, i: int, key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda doc: doc[section][i].__setitem__(key, value)


_DEEP = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b', "categories": []}'

# name -> (file bytes, None if accepted else (problem code, fragment of the refusal))
CASES: dict[str, tuple[bytes, tuple[str, str] | None]] = {
    "valid": (_doc(lambda d: None), None),
    "utf8-bom": (b"\xef\xbb\xbf" + _doc(lambda d: None), None),
    "empty-but-valid": (json.dumps({"images": [], "categories": [{"id": 1, "name": "cat"}]}).encode(), None),
    "no-annotations-key": (_doc(lambda d: d.pop("annotations")), None),
    "tiny-box-1e-30": (_doc(_set("annotations", 1, "bbox", [3, 4, 1e-30, 1e-30])), None),
    "negative-width": (_doc(_set("annotations", 1, "bbox", [3, 4, -8, 8])), None),
    "no-annotation-ids-or-areas": (
        _doc(lambda d: [(a.pop("id"), a.pop("area"), a.pop("iscrowd")) for a in d["annotations"]]),
        None,
    ),
    "image-id-2**70": (
        _doc(lambda d: [_set("images", 0, "id", 2**70)(d), _set("annotations", 0, "image_id", 2**70)(d)]),
        ("malformed_image", "images[0]: 'id' must be an integer within the 64-bit range"),
    ),
    "string-in-annotations": (
        _doc(lambda d: d["annotations"].append("a box")),
        ("malformed_annotation", "annotations[2]: expected an object, got str"),
    ),
    "deeply-nested": (_DEEP, ("unreadable_annotation_file", "nested deeper than the parser allows")),
    "duplicate-category-names": (
        _doc(_set("categories", 1, "name", "cat")),
        ("duplicate_category_name", "categories[1]: duplicate category name 'cat'"),
    ),
    "duplicate-image-ids": (
        _doc(_set("images", 1, "id", 1)),
        ("duplicate_image_id", "images[1] (id 1): duplicate image id 1"),
    ),
    "nan-box": (
        _doc(_set("annotations", 0, "bbox", [1, float("nan"), 10, 12])),
        ("nonfinite_box", "annotations[0] (id 1): bbox [1, nan, 10, 12] holds a non-finite value"),
    ),
    "huge-integer-box": (
        _doc(_set("annotations", 0, "bbox", [10**400, 2, 10, 12])),
        ("nonfinite_box", "non-finite"),
    ),
    "bbox-of-3-numbers": (
        _doc(_set("annotations", 0, "bbox", [1, 2, 10])),
        ("malformed_annotation", "'bbox' must be a list of 4 numbers [x, y, w, h], got [1, 2, 10]"),
    ),
    "category-id-as-string": (
        _doc(_set("categories", 0, "id", "1")),
        ("malformed_category", "categories[0]: 'id' must be an integer within the 64-bit range, got '1'"),
    ),
    "annotation-category-id-as-string": (
        _doc(_set("annotations", 0, "category_id", "1")),
        ("malformed_annotation", "'category_id' must be an integer, got '1'"),
    ),
    "bool-image-id": (
        _doc(_set("annotations", 0, "image_id", True)),
        ("malformed_annotation", "'image_id' must be an integer, got True"),
    ),
    "area-as-string": (
        _doc(_set("annotations", 0, "area", "big")),
        ("malformed_annotation", "'area' must be a finite number, got 'big'"),
    ),
    "unknown-image": (
        _doc(_set("annotations", 1, "image_id", 9)),
        ("unknown_image_id", "annotations[1] (id 2): image_id 9 is not in 'images'"),
    ),
    "missing-images": (_doc(lambda d: d.pop("images")), ("bad_structure", "missing top-level key 'images'")),
    "not-an-object": (b"[1, 2]", ("bad_structure", "expected a JSON object, got list")),
    "not-utf8": (b"\xff\xfe\x00garbage", ("unreadable_annotation_file", "not valid JSON")),
}


def _verdict(run: Callable[[], Any]) -> str | None:
    """None when ``run`` accepts the file, else the DatasetError message."""
    try:
        run()
    except DatasetError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader_check_and_eval_agree(name, tmp_path, capsys):
    content, refusal = CASES[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(content)

    reader = _verdict(lambda: COCODetection(path, tmp_path, remove_images_without_annotations=True))
    evaluation = _verdict(lambda: load_ground_truth(path))
    report = check_dataset(path, None)
    cli_code = main(["data", "check", str(path), "--no-progress"])
    text = capsys.readouterr().out

    if refusal is None:
        assert reader is None and evaluation is None, (reader, evaluation)
        assert report.ok and cli_code == 0, report.format()
        return
    code, fragment = refusal
    assert reader is not None and reader == evaluation  # one schema, one message
    assert reader.startswith(f"{path}: ") and fragment in reader, reader
    assert not report.ok and cli_code == 1
    assert report.fatal[0].code == code, [p.code for p in report.fatal]
    assert text.startswith(str(path)) and code in text


def test_table_covers_the_issue_cases():
    accepted = [n for n, (_, r) in CASES.items() if r is None]
    assert len(CASES) >= 12 and len(accepted) >= 5


def test_python_m_atssdet_data_check_exit_codes(tmp_path):
    """The real `python -m atssdet data check FILE` exit status, every case, one interpreter."""
    paths = {}
    for name, (content, _) in CASES.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_bytes(content)
    script = (
        "import json, runpy, sys\n"
        "codes = {}\n"
        "for name, path in json.loads(sys.argv[1]).items():\n"
        "    sys.argv = ['atssdet', 'data', 'check', path, '--no-progress']\n"
        "    try:\n"
        "        runpy.run_module('atssdet', run_name='__main__')\n"
        "    except SystemExit as exc:\n"
        "        codes[name] = exc.code\n"
        "print('CODES', json.dumps(codes))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps({k: str(v) for k, v in paths.items()})],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    codes = json.loads(proc.stdout.rsplit("CODES ", 1)[1])
    assert codes == {name: 0 if refusal is None else 1 for name, (_, refusal) in CASES.items()}


def test_warnings_do_not_change_the_verdict(tmp_path):
    """The accepted edge cases load with the box rule decided once: 1e-30 and negative boxes are degenerate."""
    path = tmp_path / "tiny.json"
    path.write_bytes(CASES["tiny-box-1e-30"][0])
    report = check_dataset(path, None)
    assert [p.code for p in report.warnings] == ["degenerate_box", "no_valid_box_image", "unused_category"]
    assert report.class_counts == {1: ("cat", 1), 2: ("dog", 0)}
    dataset = COCODetection(path, tmp_path, remove_images_without_annotations=True)
    assert dataset.image_ids == [1]  # image 2's only box is empty in float32: not a target
    assert read_coco_file(path).annotations.trainable.tolist() == [True, False]


def test_eval_scores_a_file_without_annotation_ids_or_areas(tmp_path):
    """pycocotools alone fails on such a file (KeyError 'id'); eval numbers the boxes and uses w * h."""
    path = tmp_path / "bare.json"
    path.write_bytes(CASES["no-annotation-ids-or-areas"][0])
    gt = load_ground_truth(path)
    assert [a["id"] for a in gt.dataset["annotations"]] == [1, 2]
    assert [a["area"] for a in gt.dataset["annotations"]] == [120.0, 64.0]
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in _valid()["annotations"]
    ]
    stats = coco_stats(path, perfect)
    assert stats["AP"] == pytest.approx(1.0) and np.isclose(stats["AR100"], 1.0)

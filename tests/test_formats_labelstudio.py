"""Label Studio JSON / JSON-MIN exports read into the COCO structure; their problems named by task and result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from atssdet.cli import main
from atssdet.data.formats import detect_format, read_split, resolve_split
from atssdet.data.formats.labelstudio import image_name


def _image(path: Path, h: int = 40, w: int = 50) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 127, np.uint8))


def _rect(label: str, x: float, y: float, w: float, h: float, size=(50, 40), rotation: float = 0.0) -> dict:
    """A rectanglelabels result for a box in pixels (stored in percent, as Label Studio does)."""
    width, height = size
    value = {"x": 100 * x / width, "y": 100 * y / height, "width": 100 * w / width, "height": 100 * h / height,
             "rotation": rotation, "rectanglelabels": [label]}  # fmt: skip
    return {"type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": width,
            "original_height": height, "image_rotation": 0, "value": value}  # fmt: skip


def _task(url: str, *results: dict, cancelled_first: bool = False) -> dict:
    annotations = [{"id": 2, "was_cancelled": False, "result": list(results)}]
    if cancelled_first:
        annotations.insert(0, {"id": 1, "was_cancelled": True, "result": [_rect("ghost", 1, 1, 5, 5)]})
    return {"id": 1, "data": {"image": url}, "annotations": annotations,
            "predictions": [{"result": [_rect("predicted", 1, 1, 5, 5)]}]}  # fmt: skip


def test_export_reads_into_coco_pixels_every_kind_of_url(tmp_path):
    """Percent -> pixels, upload prefixes and local-files paths resolved, the first annotation not
    cancelled taken (predictions never), non-box results warned about, an image without boxes sized
    from its file, classes sorted."""
    images = tmp_path / "images"
    for name in ("cat.png", "dog.png", "sub/empty.png"):
        _image(images / name)
    polygon = {
        "type": "polygonlabels",
        "value": {"points": [[1, 1], [5, 5], [1, 5]], "polygonlabels": ["cat"]},
    }
    choice = {"type": "choices", "value": {"choices": ["indoor"]}}
    tasks = [
        _task("/data/upload/3/8f2a1c3e-cat.png", _rect("zebra", 1.5, 2, 20.25, 30), _rect("cat", 10, 0, 40, 40),
              polygon, choice, cancelled_first=True),
        _task("s3://bucket/photos/dog.png?X-Amz-Signature=1", _rect("cat", 0, 0, 50, 40)),
        _task("/data/local-files/?d=sub%2Fempty.png"),
    ]  # fmt: skip
    export = tmp_path / "project.json"
    export.write_text(json.dumps(tasks))
    assert detect_format(export) == "labelstudio"
    split = resolve_split(export)
    assert split.format == "labelstudio" and split.image_root == str(images)
    coco = split.annotations.coco()
    assert not [p for p in coco.problems if p.severity == "fatal"]
    assert [p.code for p in coco.problems] == ["unsupported_shape", "empty_image"]  # the COCO schema warns
    raw = split.annotations.raw
    assert [c["name"] for c in raw["categories"]] == ["cat", "zebra"]
    assert [(i["file_name"], i["height"], i["width"]) for i in raw["images"]] == [
        ("cat.png", 40, 50), ("dog.png", 40, 50), ("sub/empty.png", 40, 50),
    ]  # fmt: skip
    boxes = [(a["image_id"], a["category_id"], a["bbox"]) for a in raw["annotations"]]
    assert [b[:2] for b in boxes] == [(1, 2), (1, 1), (2, 1)]
    np.testing.assert_allclose([b[2] for b in boxes], [[1.5, 2, 20.25, 30], [10, 0, 40, 40], [0, 0, 50, 40]],
                               atol=1e-9)  # fmt: skip


def test_json_min_and_rotated_boxes(tmp_path):
    _image(tmp_path / "a.png", 100, 100)
    rotated = _rect("cat", 20, 10, 30, 10, size=(100, 100), rotation=90)["value"]
    flat = [{"image": "/data/upload/1/a.png", "id": 4, "label": [
        {**rotated, "original_width": 100, "original_height": 100},
    ]}]  # fmt: skip
    export = tmp_path / "min.json"
    export.write_text(json.dumps(flat))
    raw = read_split(export, "labelstudio", None).raw
    (ann,) = raw["annotations"]
    # 30x10 rotated 90 degrees clockwise about (20, 10): x from 20 - 10 to 20, y from 10 to 40.
    np.testing.assert_allclose(ann["bbox"], [10, 10, 10, 30], atol=1e-9)
    assert math.isclose(ann["area"], 300, rel_tol=1e-9)


def test_only_a_list_of_tasks_is_label_studio(tmp_path):
    for text, fmt in (('[{"id": 1, "data": {"image": "a.png"}}]', "labelstudio"), ('  [{"image": "a.png"}]', "labelstudio"),
                      ("[1, 2]", "coco"), ("[]", "coco"), ('{"images": []}', "coco")):  # fmt: skip
        (tmp_path / "x.json").write_text(text)
        assert detect_format(tmp_path / "x.json") == fmt, text


def test_cli_lists_every_format():
    from atssdet.cli.data import DATA_FORMATS
    from atssdet.data.formats import FORMATS

    assert DATA_FORMATS == FORMATS


def test_image_name_rules(tmp_path):
    (tmp_path / "8f2a1c3e-kept.png").write_bytes(b"")
    (tmp_path / "bare.png").write_bytes(b"")
    assert image_name("/data/upload/2/8f2a1c3e-kept.png", tmp_path) == "8f2a1c3e-kept.png"  # the file has it
    assert image_name("/data/upload/2/0badc0de-bare.png", tmp_path) == "bare.png"
    assert image_name("/data/local-files/?d=a/b%20c.jpg", tmp_path) == "a/b c.jpg"
    assert image_name("http://host/x/y.jpg?token=1", tmp_path) == "y.jpg"


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["data", "check", *args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_data_check_names_the_task_and_result(tmp_path, capsys):
    _image(tmp_path / "a.png")
    bad_value = _rect("cat", 1, 1, 5, 5)
    bad_value["value"]["x"] = "left"
    no_size = _rect("cat", 1, 1, 5, 5)
    del no_size["original_width"]
    tasks = [_task("/data/upload/1/a.png", _rect("cat", 1, 1, 5, 5), bad_value, _rect("cat", 60, 2, 20, 28), no_size),
             _task("/data/upload/1/missing.png"), {"data": {"text": "no image"}}]  # fmt: skip
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    code, out = _check(capsys, str(export))
    assert code == 1
    assert f"{export}: task[1] (a.png)/result[2]: x, y, width, height must be numbers" in out
    assert f"{export}: task[1] (a.png)/result[4]: needs positive whole original_width" in out
    assert f"{export}: task[1] (a.png)/result[3]: bbox [60, 2, 20, 28] vs image 50x40" in out
    assert f"{export}: task[2] (missing.png): no box gives its size" in out
    assert f"{export}: task[3]: no image URL" in out

    export.write_text('[{"data": {"image": "a.png"}, "annotations": [}]')
    code, out = _check(capsys, str(export))
    assert code == 1 and "malformed_json" in out and "line 1 column" in out


def test_train_on_a_label_studio_export_and_convert_it(tmp_path, capsys):
    for name in ("a.png", "b.png"):
        _image(tmp_path / "images" / name, 64, 64)
    tasks = [
        _task(f"/data/upload/1/{n}", _rect(c, 8, 8, 30, 30, size=(64, 64)))
        for n, c in (("a.png", "cat"), ("b.png", "dog"))
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    code = main(["data", "convert", str(export), "--to", "yolo", "--out", str(tmp_path / "yolo")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "yolo" / "data.yaml").is_file()
    labels = sorted((tmp_path / "yolo" / "labels").rglob("*.txt"))
    assert [p.name for p in labels] == ["a.txt", "b.txt"]
    code = main(["train", "--data", str(export), "--out", str(tmp_path / "run"), "--max-iters", "1", "--device", "cpu",
                 "--no-progress", "--set", "backbone=resnet18", "--set", "train_image_short_size=[64]",
                 "--set", "train_image_max_size=64", "--set", "test_image_short_size=64",
                 "--set", "test_image_max_size=64"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model_final.safetensors").is_file()

"""``data check`` on bad YOLO / VOC / CVAT input: each problem named by file and line or element."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from atssdet.cli import main


def _image(path: Path, h: int = 40, w: int = 50) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 127, np.uint8))


def _yolo(
    root: Path, labels: dict[str, str], *, yaml: str = "train: images/train\nnames: [cat, dog]\n"
) -> Path:
    for stem, text in labels.items():
        if not stem.startswith("ghost"):
            _image(root / "images" / "train" / f"{stem}.png")
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    (root / "data.yaml").write_text(yaml)
    return root


def _voc(root: Path, xml: dict[str, str]) -> Path:
    (root / "Annotations").mkdir(parents=True)
    for stem, text in xml.items():
        _image(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(text)
    return root


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["data", "check", *args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out + out.err


def _voc_object(name: str, box: tuple[str, str, str, str]) -> str:
    tags = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
    return f"<object><name>{name}</name><bndbox>{tags}</bndbox></object>"


def _voc_doc(*objects: str) -> str:
    return f"<annotation><filename>a.jpg</filename><size><width>50</width><height>40</height></size>{''.join(objects)}</annotation>"


def test_yolo_class_id_out_of_range_box_outside_and_orphan_label(tmp_path, capsys):
    root = _yolo(
        tmp_path,
        {"a": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n", "b": "1 0.95 0.5 0.3 0.2\n0 1.6 0.5 0.2 0.2\n",
         "ghost": "0 0.5 0.5 0.1 0.1\n"},
    )  # fmt: skip
    code, out = _check(capsys, str(root))
    assert code == 1
    labels = root / "labels" / "train"
    assert f"{labels / 'a.txt'}:3: class id 7 out of range 0..1" in out
    assert "FATAL   class_out_of_range x1" in out
    assert f"{labels / 'b.txt'}:1: bbox" in out and "box_partly_outside x1" in out  # reaches x = 1.1 W
    assert f"{labels / 'b.txt'}:2: bbox" in out and "box_outside_image x1" in out
    assert f"{labels / 'ghost.txt'}: no image for it" in out and "orphan_label" in out


def test_yolo_malformed_lines_and_empty_or_broken_data_yaml(tmp_path, capsys):
    root = _yolo(tmp_path / "lines", {"a": "0 0.5 0.5 0.2\n0 0.5 nan 0.2 0.2\n0 0.5 0.5 0.2 0.2\n"})
    code, out = _check(capsys, str(root))
    assert code == 1
    assert f"{root / 'labels' / 'train' / 'a.txt'}:1: expected 'class cx cy w h'" in out
    assert f"{root / 'labels' / 'train' / 'a.txt'}:2: not a finite number" in out

    empty = _yolo(tmp_path / "empty", {"a": "0 0.5 0.5 0.2 0.2\n"}, yaml="")
    code, out = _check(capsys, str(empty))
    assert code == 1 and f"{empty / 'data.yaml'}: empty file (needs 'names'" in out

    broken = _yolo(tmp_path / "broken", {"a": ""}, yaml="train: images/train\nnames: [cat, dog\n")
    code, out = _check(capsys, str(broken / "data.yaml"))
    assert code == 1 and f"{broken / 'data.yaml'}:3: not valid YAML" in out

    nc = _yolo(tmp_path / "nc", {"a": ""}, yaml="train: images/train\nnc: 3\nnames: [cat, dog]\n")
    code, out = _check(capsys, str(nc))
    assert code == 1 and "nc is 3 but 'names' lists 2 classes" in out


def test_voc_malformed_xml_bad_element_unknown_class_and_box_outside(tmp_path, capsys):
    root = _voc(
        tmp_path / "voc",
        {"a": _voc_doc(_voc_object("cat", ("1", "1", "10", "10")), _voc_object("cat", ("45", "5", "60", "20"))),
         "b": "<annotation><filename>b.jpg</filename>\n<object><name>cat</name>\n</annotation>",
         "c": _voc_doc(_voc_object("cat", ("1", "1", "ten", "10")))},
    )  # fmt: skip
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "Annotations" / "d.xml").write_text(_voc_doc(_voc_object("horse", ("1", "1", "5", "5"))))
    _image(root / "JPEGImages" / "d.jpg")
    code, out = _check(capsys, str(root))
    assert code == 1
    ann = root / "Annotations"
    assert f"{ann / 'b.xml'}: line 3, column 3: mismatched tag" in out
    assert f"{ann / 'c.xml'}: object[1]/bndbox/xmax: not a finite number: 'ten'" in out
    assert f"{ann / 'd.xml'}: object[1]: 'horse' is not in the class list" in out
    assert f"{ann / 'a.xml'}: object[2]: bbox [44, 4, 16, 16] vs image 50x40" in out  # 1-based -> x 44


def test_voc_entity_expansion_is_refused(tmp_path, capsys):
    bomb = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx"><!ENTITY y "&x;&x;&x;&x;">]><annotation>&y;</annotation>'
    root = _voc(tmp_path / "voc", {"a": bomb})
    code, out = _check(capsys, str(root))
    assert code == 1 and "malformed_xml" in out and str(root / "Annotations" / "a.xml") in out


def test_cvat_malformed_xml_bad_box_and_box_outside(tmp_path, capsys):
    _image(tmp_path / "images" / "a.png")
    xml = tmp_path / "annotations.xml"
    xml.write_text(
        "<annotations><version>1.1</version><meta><task><labels><label><name>cat</name></label></labels></task>"
        '</meta><image id="0" name="a.png" width="50" height="40"><box label="cat" xtl="1" ytl="2" xbr="20" ybr="30"/>'
        '<box label="cat" xtl="60" ytl="2" xbr="80" ybr="30"/><box label="cat" xtl="1" ytl="q" xbr="20" ybr="30"/>'
        '<box label="dog" xtl="1" ytl="2" xbr="20" ybr="30"/></image></annotations>'
    )
    code, out = _check(capsys, str(xml))
    assert code == 1
    assert f"{xml}: image[1] (name 'a.png')/box[3]: needs 'label' and numeric" in out
    assert f"{xml}: image[1] (name 'a.png')/box[4]: label 'dog' is not among the <meta> labels" in out
    assert f"{xml}: image[1] (name 'a.png')/box[2]: bbox [60, 2, 20, 28] vs image 50x40" in out

    xml.write_text(
        '<annotations><image id="0" name="a.png" width="50" height="40">\n<box label="cat"></annotations>'
    )
    code, out = _check(capsys, str(xml))
    assert code == 1 and f"{xml}: line 2, column" in out and "malformed_xml" in out


def test_good_yolo_dataset_checks_ok_and_train_refuses_a_bad_one(tmp_path, capsys):
    good = _yolo(tmp_path / "good", {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.3 0.3 0.2 0.2\n"})
    code, out = _check(capsys, str(good))
    assert code == 0 and "OK: 0 fatal" in out and "cat 1, dog 1" in out
    bad = _yolo(tmp_path / "bad", {"a": "5 0.5 0.5 0.2 0.2\n"})
    code = main(["train", "--data", str(bad), "--out", str(tmp_path / "run"), "--max-iters", "1", "--device", "cpu",
                 "--no-progress", "--set", "backbone=resnet18"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "class id 5 out of range" in err and "a.txt:1" in err


def test_data_convert_cli_reruns_and_refuses_foreign_files(tmp_path, capsys):
    src = _yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.3 0.3 0.2 0.2\n0 0.7 0.7 0.2 0.2\n"})
    out = tmp_path / "voc"
    assert main(["data", "convert", str(src), "--to", "voc", "--out", str(out)]) == 0
    assert "train: 2 images, 3 boxes" in capsys.readouterr().out
    assert (out / "classes.txt").read_text() == "cat\ndog\n"
    assert (out / "ImageSets" / "Main" / "train.txt").read_text() == "a\nb\n"
    assert main(["data", "convert", str(src), "--to", "voc", "--out", str(out)]) == 0  # its own files
    capsys.readouterr()
    (out / "Annotations" / "a.xml").write_text("<annotation/>")  # now a file data convert did not write
    assert main(["data", "convert", str(src), "--to", "voc", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "atssdet data: error:" in err and "a.xml" in err and "--overwrite" in err
    bad = _yolo(tmp_path / "bad", {"a": "3 0.5 0.5 0.2 0.2\n"})
    assert main(["data", "convert", str(bad), "--to", "coco", "--out", str(tmp_path / "c")]) == 2
    assert "a.txt:1: class id 3 out of range" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing written before the check passed

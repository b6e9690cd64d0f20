"""``predict --save-format yolo|voc``: a label file per image, in each format's own conventions."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import cv2
import pytest

from atssdet.detector import Detector
from atssdet.errors import OptionError
from atssdet.predict import plan_outputs, predict_files
from tests.blob_runner import CFG, BlobRunner, blob_image

RECTS = [(10, 20, 50, 40), (60, 5, 90, 70)]  # x1, y1, x2, y2 in a 100 x 120 (H x W) image


@pytest.fixture
def two_cats(tmp_path):
    """Two images named cat.png in two folders (label names must not collide), one unreadable file."""
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "cat.png")
        cv2.imwrite(str(paths[-1]), blob_image(100, 120, RECTS))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return [str(p) for p in paths] + [str(tmp_path / "broken.png")]


def _detector() -> Detector:
    return Detector(BlobRunner(), short_size=100, max_size=120)


def test_yolo_labels_hold_normalised_centre_boxes_and_scores(tmp_path, two_cats):
    report = predict_files(two_cats, detector=_detector(), out_dir=tmp_path / "out", draw=False,
                           save_format="yolo", progress=False)  # fmt: skip
    assert report.num_ok == 2 and len(report.failed) == 1
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["cat.txt", "cat_2.txt"]
    assert (out / "classes.txt").read_text().splitlines() == list(CFG.class_names)
    for name in ("cat.txt", "cat_2.txt"):
        rows = [line.split() for line in (out / "labels" / name).read_text().splitlines()]
        got = sorted(
            (int(c), (float(cx) - float(w) / 2) * 120, (float(cy) - float(h) / 2) * 100,
             (float(cx) + float(w) / 2) * 120, (float(cy) + float(h) / 2) * 100)
            for c, cx, cy, w, h, _score in rows
        )  # fmt: skip
        for row, rect in zip(got, sorted(RECTS), strict=True):
            assert row[0] == 0 and row[1:] == pytest.approx(rect, abs=0.01)


def test_voc_annotations_are_one_based_inclusive_with_the_file_name(tmp_path, two_cats):
    predict_files(two_cats[:1], detector=_detector(), out_dir=tmp_path / "out", draw=False, save_format="voc",
                  progress=False)  # fmt: skip
    root = ET.parse(tmp_path / "out" / "Annotations" / "cat.xml").getroot()
    assert root.findtext("filename") == "cat.png"
    assert (root.findtext("size/width"), root.findtext("size/height")) == ("120", "100")
    boxes = sorted(
        tuple(float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        for o in root.iter("object")
    )
    # VOC: xmin = x1 + 1 (1-based), xmax = x2 (inclusive)
    assert boxes == [pytest.approx((x1 + 1, y1 + 1, x2, y2), abs=0.01) for x1, y1, x2, y2 in sorted(RECTS)]
    assert {o.findtext("name") for o in root.iter("object")} == {CFG.class_names[0]}


def test_label_files_are_guarded_and_a_bad_format_is_named(tmp_path, two_cats):
    from atssdet.guard import OutputError

    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "cat.txt").write_text("the user's own labels\n")
    with pytest.raises(OutputError, match="cat.txt"):
        predict_files(
            two_cats, detector=_detector(), out_dir=out, draw=False, save_format="yolo", progress=False
        )
    assert (out / "labels" / "cat.txt").read_text() == "the user's own labels\n"
    with pytest.raises(OptionError, match="save_format: 'coco'"):
        plan_outputs(two_cats, out_dir=out, save_format="coco")


def test_cli_save_format_refuses_videos(tmp_path, capsys):
    from atssdet.cli import main

    (tmp_path / "clip.mp4").write_bytes(b"")
    code = main(
        [
            "predict",
            str(tmp_path / "clip.mp4"),
            "--model",
            "atss_res18_coco_3x_800size",
            "--save-format",
            "yolo",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "--save-format is for images" in capsys.readouterr().err

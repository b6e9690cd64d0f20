"""YOLO / VOC / CVAT datasets: conventions, round trips through COCO, training on the copies, writers."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from atssdet.config import PRESETS, with_overrides
from atssdet.criterion import LOSS_KEYS
from atssdet.data.formats import detect_format, read_split, resolve_split
from atssdet.data.formats.convert import convert_dataset
from atssdet.data.formats.voc import VOC_CLASSES, write_voc_xml
from atssdet.data.formats.yolo import write_yolo_labels
from atssdet.data.synth import generate_synthetic_dataset
from atssdet.structures import Detections
from tests import coco_synth
from tests.conftest import R18

TINY = with_overrides(
    PRESETS[R18],
    {"train_image_short_size": [64], "train_image_max_size": 64, "fpn_out_channels": 16, "fpn_top_in_channel": 16,
     "head_num_convs": 1, "head_norm_groups": 4, "backbone_norm": "GN", "backbone_freeze_at": 0, "warm_iters": 5,
     "basic_lr": 0.01},
)  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One synthetic set (4 train, 2 val, 64 px) and its YOLO and VOC copies, converted back to COCO."""
    root = tmp_path_factory.mktemp("formats")
    ds = generate_synthetic_dataset(
        root / "coco", num_train=4, num_val=2, image_size=(64, 64), progress=False, log=lambda m: None
    )
    for fmt in ("yolo", "voc"):
        convert_dataset(root / "coco", fmt, root / fmt)
        convert_dataset(root / fmt, "coco", root / f"{fmt}_coco")
    return root, ds


def _boxes_by_file(ann: Path) -> dict[str, list[tuple[str, list[float], int]]]:
    doc = json.loads(ann.read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    files = {i["id"]: Path(i["file_name"]).name for i in doc["images"]}
    out: dict[str, list[tuple[str, list[float], int]]] = {f: [] for f in files.values()}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]  # compared as corners: each within the tolerance
        out[files[a["image_id"]]].append((names[a["category_id"]], [x, y, x + w, y + h], a.get("iscrowd", 0)))
    return out


def _assert_same_boxes(a: Path, b: Path, *, tol: float, crowd: bool = True) -> None:
    got, want = _boxes_by_file(b), _boxes_by_file(a)
    assert got.keys() == want.keys()
    for name, objects in want.items():
        objects = [o for o in objects if crowd or not o[2]]
        assert [(o[0], o[2]) for o in got[name]] == [(o[0], o[2]) for o in objects], name
        if objects:
            diff = np.abs(np.array([o[1] for o in got[name]]) - np.array([o[1] for o in objects]))
            assert diff.max() <= tol, (name, diff.max())


def test_detect_format_from_layout(synth):
    root, _ = synth
    assert [detect_format(root / f) for f in ("coco", "yolo", "voc")] == ["coco", "yolo", "voc"]
    assert detect_format(root / "yolo" / "data.yaml") == "yolo"
    assert detect_format(root / "coco" / "annotations" / "instances_train.json") == "coco"


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_round_trip_keeps_every_box_and_class(synth, fmt):
    root, _ = synth
    for split in ("train", "val"):
        original = root / "coco" / "annotations" / f"instances_{split}.json"
        back = root / f"{fmt}_coco" / "annotations" / f"instances_{split}.json"
        _assert_same_boxes(original, back, tol=0.5)
        assert [c["name"] for c in json.loads(back.read_text())["categories"]] == list(
            c["name"] for c in json.loads(original.read_text())["categories"]
        )


def test_round_trip_of_fractional_boxes_crowd_and_sparse_ids(tmp_path):
    """Non-contiguous category ids, fractional boxes, nested file names, a crowd box: VOC rounds to whole
    pixels (<= 0.5 px) and keeps crowd as difficult; YOLO keeps the exact box and drops the crowd box."""
    ann, images = coco_synth.write_split(tmp_path / "src")
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["bbox"] = [10.3, 12.6, 20.45, 17.8]
    ann.write_text(json.dumps(doc))
    for fmt, tol, crowd in (("voc", 0.5, True), ("yolo", 1e-6, False)):
        convert_dataset(ann, fmt, tmp_path / fmt, images=str(images))
        convert_dataset(tmp_path / fmt, "coco", tmp_path / f"{fmt}_back")
        _assert_same_boxes(ann, tmp_path / f"{fmt}_back" / "annotations" / "instances_train.json", tol=tol,
                           crowd=crowd)  # fmt: skip
    xml = ET.parse(tmp_path / "voc" / "Annotations" / "b.xml").getroot()
    first = xml.find("object/bndbox")
    assert first is not None
    # COCO x 10.3, w 20.45 -> VOC 1-based inclusive: xmin round(10.3) + 1 = 11, xmax round(30.75) = 31
    assert [first.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")] == ["11", "14", "31", "30"]


def test_conventions_of_hand_written_files(tmp_path):
    """YOLO normalised centre boxes and VOC 1-based inclusive pixels, against hand-computed COCO boxes."""
    import cv2

    yolo = tmp_path / "y"
    (yolo / "images" / "train").mkdir(parents=True)
    (yolo / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(yolo / "images" / "train" / "a.png"), np.zeros((100, 200, 3), np.uint8))  # H 100, W 200
    (yolo / "labels" / "train" / "a.txt").write_text("1 0.5 0.25 0.1 0.2\n\n0 0.1 0.1 0.3 0.1 0.2 0.4\n")
    (yolo / "data.yaml").write_text("path: .\ntrain: images/train\nnames: {0: cat, 1: dog}\n")
    raw = read_split(yolo, "yolo", "train").raw
    assert [c["name"] for c in raw["categories"]] == ["cat", "dog"]
    assert raw["images"][0]["height"] == 100 and raw["images"][0]["width"] == 200
    np.testing.assert_allclose(raw["annotations"][0]["bbox"], [90.0, 15.0, 20.0, 20.0])
    assert raw["annotations"][0]["category_id"] == 2
    np.testing.assert_allclose(raw["annotations"][1]["bbox"], [20.0, 10.0, 40.0, 30.0])  # a segment's bbox

    voc = tmp_path / "v"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>50</width><height>40</height></size>"
        "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>"
        "<ymax>20</ymax></bndbox></object></annotation>"
    )
    raw = read_split(voc, "voc", None).raw
    assert raw["annotations"][0]["bbox"] == [0.0, 1.0, 10.0, 19.0] and raw["annotations"][0]["iscrowd"] == 1
    assert raw["categories"][raw["annotations"][0]["category_id"] - 1]["name"] == "dog"


def _cvat_from_coco(ann: Path, out: Path) -> None:
    doc = json.loads(ann.read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    labels = ET.SubElement(ET.SubElement(ET.SubElement(root, "meta"), "task"), "labels")
    for c in sorted(doc["categories"], key=lambda c: c["id"]):
        ET.SubElement(ET.SubElement(labels, "label"), "name").text = c["name"]
    for k, im in enumerate(sorted(doc["images"], key=lambda i: i["id"])):
        el = ET.SubElement(root, "image", id=str(k), name=im["file_name"], width=str(im["width"]),
                           height=str(im["height"]))  # fmt: skip
        for a in doc["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                ET.SubElement(el, "box", label=names[a["category_id"]], xtl=str(x), ytl=str(y), xbr=str(x + w),
                              ybr=str(y + h), occluded="0")  # fmt: skip
        ET.SubElement(el, "polygon", label=names[doc["categories"][0]["id"]], points="1,1;5,5;1,5")
    ET.ElementTree(root).write(out)


def test_training_on_yolo_voc_and_cvat_copies_gives_the_coco_losses(synth, tmp_path):
    """20 iterations on the COCO original and on its YOLO and VOC copies: the same losses (same images,
    same order); the CVAT copy reads into the same COCO structure (so it trains alike)."""
    from atssdet.training import train

    root, ds = synth
    torch.set_num_threads(1)
    runs = {}
    for fmt in ("coco", "yolo", "voc"):
        split = resolve_split(root / fmt, split="train")
        runs[fmt] = train(TINY, train_ann=split.annotations, train_images=split.image_root,
                          out_dir=tmp_path / fmt, max_iters=20, batch_size=2, num_workers=0, progress=False,
                          log_every=1, device="cpu", checkpoint_every=100, data_check="quick")  # fmt: skip
    losses = {f: np.array([[r[k] for k in LOSS_KEYS] for r in run.losses]) for f, run in runs.items()}
    assert losses["coco"].shape == (20, len(LOSS_KEYS)) and np.isfinite(losses["coco"]).all()
    # VOC stores the whole-pixel boxes exactly: bit-identical; YOLO's 12 digits round to the same float32
    # boxes here too, allowed 1e-5 (a box one float32 ulp off would move a loss by ~1e-7).
    np.testing.assert_array_equal(losses["voc"], losses["coco"])
    np.testing.assert_allclose(losses["yolo"], losses["coco"], rtol=1e-5, atol=1e-6)
    assert runs["yolo"].config.class_names == runs["coco"].config.class_names

    _cvat_from_coco(ds.train_ann, tmp_path / "annotations.xml")
    cvat = read_split(tmp_path / "annotations.xml", "cvat", None, images=ds.train_images).coco()
    coco = resolve_split(root / "voc", split="train").annotations
    assert not isinstance(coco, str)
    voc = coco.coco()
    np.testing.assert_allclose(cvat.annotations.boxes_xyxy, voc.annotations.boxes_xyxy, atol=1e-5)
    assert [r.file_name for r in cvat.sorted_images()] == [r.file_name for r in voc.sorted_images()]
    assert any(p.code == "unsupported_shape" for p in cvat.problems)


def test_eval_reads_voc_difficult_as_ignored(tmp_path):
    """A 'difficult' box is an ignore region (COCO crowd): missing it costs nothing, and a detection inside
    it is no false positive (were it a plain box, recall would be 1/2 and AP50 about 0.5)."""
    import cv2

    from atssdet.evaluation import evaluate

    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    cv2.imwrite(str(voc / "JPEGImages" / "a.png"), np.zeros((80, 100, 3), np.uint8))
    (voc / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.png</filename><size><width>100</width><height>80</height></size>"
        "<object><name>cat</name><bndbox><xmin>11</xmin><ymin>11</ymin><xmax>40</xmax><ymax>40</ymax></bndbox>"
        "</object><object><name>cat</name><difficult>1</difficult><bndbox><xmin>51</xmin><ymin>41</ymin>"
        "<xmax>90</xmax><ymax>70</ymax></bndbox></object></annotation>"
    )

    cat = VOC_CLASSES.index("cat")  # every name is a VOC class: the 20 VOC classes, in their order

    def detect(images: list[np.ndarray]) -> list[Detections]:
        boxes = torch.tensor(
            [[60.0, 45.0, 80.0, 65.0], [10.0, 10.0, 40.0, 40.0]]
        )  # inside the difficult box first
        return [Detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([cat, cat])) for _ in images]

    split = resolve_split(voc)
    report = evaluate(detect, split.annotations, split.image_root, progress=False, num_workers=0)
    assert report.stats["AP50"] == pytest.approx(1.0)


def test_writers_for_predictions_read_back(tmp_path):
    """write_yolo_labels / write_voc_xml (what predict --save-format writes) read back to the same boxes."""
    import cv2

    det = Detections(torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.5, 1.5, 99.0, 79.0]]), torch.tensor([0.9, 0.4]),
                     torch.tensor([1, 0]))  # fmt: skip
    yolo = tmp_path / "y"
    (yolo / "images" / "train").mkdir(parents=True)
    cv2.imwrite(str(yolo / "images" / "train" / "a.png"), np.zeros((80, 100, 3), np.uint8))
    write_yolo_labels(det, (80, 100), yolo / "labels" / "train" / "a.txt", with_scores=False)
    (yolo / "data.yaml").write_text("train: images/train\nnames: [a, b]\n")
    raw = read_split(yolo, "yolo", "train").raw
    xyxy = np.array([a["bbox"] for a in raw["annotations"]])
    xyxy[:, 2:] += xyxy[:, :2]
    np.testing.assert_allclose(xyxy, det.boxes.numpy(), atol=1e-6)
    assert [a["category_id"] - 1 for a in raw["annotations"]] == [1, 0]
    scored = write_yolo_labels(det, (80, 100), tmp_path / "s.txt")
    assert scored.read_text().splitlines()[0].endswith(" 0.90000")

    voc = tmp_path / "v"
    write_voc_xml(det, (80, 100), voc / "Annotations" / "a.xml", class_names=["a", "b"], file_name="a.png")
    (voc / "classes.txt").write_text("a\nb\n")
    raw = read_split(voc, "voc", None).raw
    xyxy = np.array([a["bbox"] for a in raw["annotations"]])
    xyxy[:, 2:] += xyxy[:, :2]
    np.testing.assert_allclose(xyxy, det.boxes.numpy(), atol=0.006)  # 2 decimals
    assert [a["category_id"] - 1 for a in raw["annotations"]] == [1, 0]
    assert ET.parse(voc / "Annotations" / "a.xml").getroot().findtext("object/score") == "0.90000"

"""Synthetic dataset: determinism, valid boxes, COCO readability, CLI caching."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from atssdet.data.coco import COCODetection, find_coco_split
from atssdet.data.synth import MANIFEST_NAME, SHAPE_CLASSES, generate_synthetic_dataset, render_image
from tests.conftest import run_cli

SMALL = {"num_train": 6, "num_val": 3, "image_size": (64, 96), "progress": False}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    a = generate_synthetic_dataset(tmp_path / "a", seed=3, log=lambda _: None, **SMALL)
    generate_synthetic_dataset(tmp_path / "b", seed=3, log=lambda _: None, **SMALL)
    generate_synthetic_dataset(tmp_path / "c", seed=4, log=lambda _: None, **SMALL)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db
    assert len(da) == 6 + 3 + 2 + 1  # images, two annotation files, manifest
    assert da["annotations/instances_train.json"] != dc["annotations/instances_train.json"]
    assert find_coco_split(a.root, "train") == (a.train_ann, a.train_images)
    assert not list((tmp_path / "a").rglob("*.tmp"))  # atomic writes leave no temp files


def test_dataset_reads_back_with_valid_boxes(tmp_path: Path) -> None:
    out = generate_synthetic_dataset(tmp_path, seed=0, log=lambda _: None, **SMALL)
    raw = json.loads(out.train_ann.read_text())
    assert [c["name"] for c in raw["categories"]] == list(SHAPE_CLASSES)
    ds = COCODetection(out.train_ann, out.train_images, remove_images_without_annotations=False)
    assert ds.class_names == SHAPE_CLASSES and len(ds) == 6
    for i in range(len(ds)):
        image, target = ds[i]
        h, w = image.shape[:2]
        assert 64 <= h <= 96 and 64 <= w <= 96
        boxes = target["boxes"]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 2).all()
    for ann in raw["annotations"]:
        x, y, bw, bh = ann["bbox"]
        assert all(isinstance(v, int) for v in ann["bbox"])  # pixel-aligned tight boxes
        assert 0 < ann["area"] <= bw * bh


def test_render_image_statistics() -> None:
    sizes, labels, hidden_ok = [], set(), True
    for i in range(30):
        image, objects = render_image(np.random.default_rng(i), 160, 200)
        assert image.shape == (160, 200, 3) and image.dtype == np.uint8
        for obj in objects:
            x1, y1, x2, y2 = obj["bbox_xyxy"]
            assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 160
            sizes.append(max(x2 - x1, y2 - y1))
            labels.add(obj["label"])
            hidden_ok &= obj["area"] > 0
    assert labels == set(range(len(SHAPE_CLASSES)))
    assert min(sizes) <= 16 and max(sizes) >= 60  # ~12 px up to half the short side (80)
    assert max(sizes) <= 82
    assert hidden_ok


def test_cli_generates_then_library_skips(tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = ["data", "synth", "--out", str(out), "--num-train", "2", "--num-val", "1"]
    first = run_cli(*args, "--image-size", "64", "--seed", "1", "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "wrote 2 train images" in first.stdout
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["params"]["num_train"] == 2 and manifest["params"]["image_size_max"] == 64
    before = _digest(out)
    messages: list[str] = []
    same = {"num_train": 2, "num_val": 1, "seed": 1, "image_size": (64, 64), "progress": False}
    again = generate_synthetic_dataset(out, log=messages.append, **same)
    assert again.skipped and "skipping" in messages[0]
    assert _digest(out) == before
    (out / "train" / "train_000002.png").unlink()  # incomplete -> regenerated
    assert not generate_synthetic_dataset(out, log=messages.append, **same).skipped
    assert _digest(out) == before
    with pytest.raises(ValueError, match="--force"):
        generate_synthetic_dataset(out, log=messages.append, **{**same, "num_train": 1})
    generate_synthetic_dataset(out, log=messages.append, force=True, **{**same, "num_train": 1})
    assert sorted(p.name for p in (out / "train").iterdir()) == ["train_000001.png"]  # stale file removed


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="image size"):
        generate_synthetic_dataset("unused", num_train=1, num_val=1, image_size=(16, 16), progress=False)
    with pytest.raises(ValueError, match="format"):
        generate_synthetic_dataset("unused", num_train=1, num_val=1, image_format="gif", progress=False)

"""COCO-format reader: id/label mapping, MegEngine filtering rules, named errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from atssdet.data.coco import COCODetection, find_coco_split
from atssdet.data.coco_records import DatasetError
from atssdet.data.transforms import get_hw_by_short_size, resize_image_and_boxes


class _TestResize:
    """A picklable deterministic transform: the test-time resize, boxes scaled alike (rng unused)."""

    def __call__(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> tuple:
        return resize_image_and_boxes(image, boxes, get_hw_by_short_size(*image.shape[:2], 40, 100))


def _write_image(path: Path, h: int, w: int, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((h, w, 3), value, dtype=np.uint8)
    image[0, 0] = (1, 2, 3)  # marks orientation
    assert cv2.imwrite(str(path), image)


def _dataset_json() -> dict:
    # Image ids deliberately unrelated to file names and listed out of order.
    return {
        "images": [
            {"id": 42, "file_name": "b/zebra photo #1.png", "height": 20, "width": 30},
            {"id": 7, "file_name": "000000000999.png", "height": 40, "width": 10},
            {"id": 1000, "file_name": "empty.png", "height": 8, "width": 8},
            {"id": 5, "file_name": "only_crowd_and_degenerate.png", "height": 10, "width": 10},
        ],
        "categories": [
            {"id": 90, "name": "toothbrush"},
            {"id": 3, "name": "car"},
            {"id": 17, "name": "cat"},
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 17, "bbox": [1.5, 2.0, 10.0, 5.0], "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 90, "bbox": [0, 0, 30, 20], "iscrowd": 0},
            {"id": 3, "image_id": 42, "category_id": 3, "bbox": [5, 5, 4, 4], "iscrowd": 1},  # crowd
            {"id": 4, "image_id": 7, "category_id": 3, "bbox": [2, 3, 4, 5]},  # iscrowd missing -> 0
            {"id": 5, "image_id": 7, "category_id": 17, "bbox": [2, 3, 0, 5], "iscrowd": 0},  # w == 0
            {"id": 6, "image_id": 5, "category_id": 17, "bbox": [1, 1, 5, -2], "iscrowd": 0},  # h < 0
            {"id": 7, "image_id": 5, "category_id": 17, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd
            {"id": 8, "image_id": 5, "category_id": 3, "bbox": [12, 1, 5, 5], "iscrowd": 0},  # outside image
        ],
    }


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imgs"
    for img in _dataset_json()["images"]:
        _write_image(root / img["file_name"], img["height"], img["width"], value=img["id"] % 200)
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(_dataset_json()))
    return ann, root


def test_ids_labels_and_filtering(tiny: tuple[Path, Path]) -> None:
    ann, root = tiny
    ds = COCODetection(ann, root, remove_images_without_annotations=True)
    # Categories sorted by id -> contiguous labels, and back.
    assert ds.category_ids == (3, 17, 90)
    assert ds.class_names == ("car", "cat", "toothbrush")
    assert ds.label_to_category_id == (3, 17, 90)
    assert ds.category_id_to_label == {3: 0, 17: 1, 90: 2}
    # Sorted by image id; 1000 (no annotation) and 5 (only crowd/degenerate/outside) are dropped.
    assert ds.image_ids == [7, 42]
    assert len(ds) == 2

    image, target = ds[1]
    assert image.dtype == np.uint8 and image.shape == (20, 30, 3)
    assert target["image_id"] == 42 and target["orig_hw"] == (20, 30)
    np.testing.assert_array_equal(target["boxes"], np.array([[1.5, 2, 11.5, 7], [0, 0, 30, 20]], np.float32))
    assert target["boxes"].dtype == np.float32
    np.testing.assert_array_equal(target["labels"], np.array([1, 2]))
    assert target["labels"].dtype == np.int64

    _, target7 = ds[0]
    np.testing.assert_array_equal(target7["boxes"], [[2, 3, 6, 8]])
    np.testing.assert_array_equal(target7["labels"], [0])
    np.testing.assert_allclose(ds.aspect_ratios(), [40 / 10, 20 / 30])
    assert ds.image_info(0).file_name == "000000000999.png"


def test_keep_all_images_for_evaluation(tiny: tuple[Path, Path]) -> None:
    ann, root = tiny
    ds = COCODetection(ann, root, remove_images_without_annotations=False)
    assert ds.image_ids == [5, 7, 42, 1000]
    _, target = ds[0]  # crowd, degenerate and outside boxes never reach the targets
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    _, target = ds[3]
    assert target["boxes"].shape == (0, 4)


def test_transform_and_seeded_keys(tiny: tuple[Path, Path]) -> None:
    ann, root = tiny
    ds = COCODetection(
        ann,
        root,
        remove_images_without_annotations=True,
        transform=_TestResize(),
    )
    image, target = ds[(1, 123)]
    assert image.shape == (40, 60, 3)  # 20x30 -> short side 40
    np.testing.assert_allclose(target["boxes"], [[3, 4, 23, 14], [0, 0, 60, 40]])
    assert target["orig_hw"] == (20, 30)
    # Picklable for DataLoader workers.
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[(1, 5)][1]["boxes"], target["boxes"])


def test_image_size_mismatch_named(tiny: tuple[Path, Path]) -> None:
    ann, root = tiny
    _write_image(root / "000000000999.png", 41, 10)
    ds = COCODetection(ann, root, remove_images_without_annotations=True)
    with pytest.raises(DatasetError, match=r"000000000999\.png.*41x10.*40x10"):
        ds[0]


def test_missing_image_file_named(tiny: tuple[Path, Path]) -> None:
    ann, root = tiny
    (root / "000000000999.png").unlink()
    ds = COCODetection(ann, root, remove_images_without_annotations=True)
    with pytest.raises(ValueError, match=r"000000000999\.png"):
        ds[0]


def _mutate(data: dict, path: str, value: object) -> dict:
    *keys, last = path.split(".")
    node = data
    for k in keys:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is _DELETE:
        del node[int(last) if isinstance(node, list) else last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("images", _DELETE, r"missing top-level key 'images'"),
        ("categories", {"id": 1}, r"'categories' must be a list"),
        ("images.1.file_name", _DELETE, r"images\[1\] \(id 7\): missing key 'file_name'"),
        ("images.0.height", "20", r"images\[0\] \(id 42\): 'height' must be a positive integer"),
        ("images.0.id", 7, r"duplicate image id 7"),
        ("annotations.0.category_id", 4, r"annotations\[0\] \(id 1\): unknown category_id 4"),
        ("annotations.1.image_id", 8, r"annotations\[1\] \(id 2\): image_id 8 is not in 'images'"),
        ("annotations.2.bbox", [1, 2, 3], r"annotations\[2\] \(id 3\): 'bbox' must be a list of 4 numbers"),
        ("annotations.3.bbox", _DELETE, r"annotations\[3\] \(id 4\): missing key 'bbox'"),
        ("annotations.0.iscrowd", 2, r"'iscrowd' must be 0 or 1"),
        ("annotations.4.bbox", [1, 2, float("nan"), 3], r"annotations\[4\] \(id 5\): bbox .* non-finite"),
        (
            "annotations.5.bbox",
            [1, "2", 3, 4],
            r"annotations\[5\] \(id 6\): 'bbox' must be a list of 4 numbers",
        ),
        ("annotations.6.image_id", 7.0, r"annotations\[6\] \(id 7\): 'image_id' must be an integer"),
        ("categories.0.id", 3, r"duplicate category id 3"),
    ],
)
def test_malformed_json_named_errors(tmp_path: Path, path: str, value: object, message: str) -> None:
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(_mutate(_dataset_json(), path, value)))
    with pytest.raises(DatasetError, match=message) as info:
        COCODetection(ann, tmp_path, remove_images_without_annotations=True)
    assert str(ann) in str(info.value)


def test_unreadable_files_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DatasetError, match=r"nope\.json: annotation file not found"):
        COCODetection(missing, tmp_path, remove_images_without_annotations=True)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON"):
        COCODetection(broken, tmp_path, remove_images_without_annotations=True)
    arr = tmp_path / "list.json"
    arr.write_text("[]")
    with pytest.raises(DatasetError, match=r"list\.json: expected a JSON object"):
        COCODetection(arr, tmp_path, remove_images_without_annotations=True)


def test_find_coco_split(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    (tmp_path / "val2017").mkdir()
    assert find_coco_split(tmp_path, "val2017") == (
        tmp_path / "annotations" / "instances_val2017.json",
        tmp_path / "val2017",
    )
    with pytest.raises(DatasetError, match="no annotation file for split 'train2017'"):
        find_coco_split(tmp_path, "train2017")

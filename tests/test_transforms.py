"""Training/eval transforms and collate: exact parity with MegEngine's reference train step."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from atssdet.data.collate import DetectionBatch, collate_detection
from atssdet.data.transforms import (
    TrainTransform,
    get_hw_by_short_size,
    get_train_hw_by_short_size,
    hflip_image_and_boxes,
    resize_image_and_boxes,
    train_transform,
)

R18 = "atss_res18_coco_3x_800size"


def to_megengine_inputs(batch: DetectionBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seed's training inputs (MegEngine ``DetectionPadCollator`` layout), to compare with the reference.

    ``image`` float32 [N, 3, H, W], ``im_info`` float32 [N, 5] = (h, w, orig_h, orig_w, num_gts) and
    ``gt_boxes`` float32 [N, M_max, 5] = (x1, y1, x2, y2, class 1..C), zero rows past ``num_gts``.
    """
    n = len(batch.targets)
    m_max = max((len(t.labels) for t in batch.targets), default=0)
    gt_boxes = torch.zeros((n, m_max, 5), dtype=torch.float32)
    for i, t in enumerate(batch.targets):
        gt_boxes[i, : len(t.labels), :4] = t.boxes
        gt_boxes[i, : len(t.labels), 4] = (t.labels + 1).to(torch.float32)
    num_gts = torch.tensor([len(t.labels) for t in batch.targets], dtype=torch.float32)[:, None]
    im_info = torch.cat([batch.image_hw.to(torch.float32), batch.orig_hw.to(torch.float32), num_gts], dim=1)
    return batch.images, im_info, gt_boxes


def test_train_step_parity(reference_dir: Path) -> None:
    """Transform + collate reproduce MegEngine's ``data``, ``im_info`` and ``gt_boxes`` bit for bit."""
    step = np.load(reference_dir / f"{R18}.seed0.train_step.npz")
    outputs = np.load(reference_dir / f"{R18}.seed0.outputs.npz")
    samples = []
    for i, name in enumerate(step["image_names"]):
        image = outputs[f"{name}__image"]
        gt = step[f"orig_gt_boxes_{i}"]
        hw = get_train_hw_by_short_size(image.shape[0], image.shape[1], int(step["short_sizes"][i]), 1333)
        image_t, boxes = resize_image_and_boxes(image, gt[:, :4], hw)
        if step["flipped"][i]:
            image_t, boxes = hflip_image_and_boxes(image_t, boxes)
        labels = gt[:, 4].astype(np.int64) - 1  # class ids 1..80 -> labels 0..79
        samples.append(
            (image_t, {"boxes": boxes, "labels": labels, "image_id": i, "orig_hw": image.shape[:2]})
        )
    batch = collate_detection(samples)
    data, im_info, gt_boxes = to_megengine_inputs(batch)
    assert data.dtype == torch.float32
    np.testing.assert_array_equal(data.numpy(), step["data"])
    np.testing.assert_array_equal(im_info.numpy(), step["im_info"])
    np.testing.assert_array_equal(gt_boxes.numpy(), step["gt_boxes"])
    assert batch.image_hw.tolist() == [[1067, 800], [1097, 768]]
    assert batch.orig_hw.tolist() == [[612, 459], [1000, 700]]


def test_train_hw_follows_megengine_shortest_edge_resize() -> None:
    # Uncapped: the short side is exactly the chosen size.
    assert get_train_hw_by_short_size(612, 459, 800, 1333) == (1067, 800)
    assert get_train_hw_by_short_size(1000, 700, 768, 1333) == (1097, 768)
    assert get_train_hw_by_short_size(300, 400, 640, 1333) == (640, 853)
    # Capped long side.
    assert get_train_hw_by_short_size(100, 1000, 800, 1333) == (133, 1333)
    # MegEngine's train transform scales (size, scale*w) by max/long, the eval helper scales H, W by one
    # factor: they differ at float ties, e.g. 11x682 at 800 where the exact height is 11*1333/682 = 21.5.
    assert get_train_hw_by_short_size(11, 682, 800, 1333) == (21, 1333)
    assert get_hw_by_short_size(11, 682, 800, 1333) == (22, 1333)


def test_flip_hand_computed() -> None:
    image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    boxes = np.array([[0, 0, 2, 1], [1.5, 0.5, 5, 2]], np.float32)
    flipped, fboxes = hflip_image_and_boxes(image, boxes)
    np.testing.assert_array_equal(flipped[:, 0], image[:, 4])
    np.testing.assert_array_equal(fboxes, [[3, 0, 5, 1], [0, 0.5, 3.5, 2]])
    back, bboxes = hflip_image_and_boxes(flipped, fboxes)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(bboxes, boxes)


def test_resize_scales_boxes_in_float32() -> None:
    image = np.zeros((10, 20, 3), np.uint8)
    out, boxes = resize_image_and_boxes(image, np.array([[2, 4, 20, 10]], np.float32), (15, 30))
    assert out.shape == (15, 30, 3)
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[3, 6, 30, 15]])
    empty = resize_image_and_boxes(image, np.zeros((0, 4), np.float32), (15, 30))[1]
    assert empty.shape == (0, 4)


def test_train_transform_is_seeded_and_covers_choices() -> None:
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    boxes = np.array([[1, 2, 11, 22]], np.float32)
    sizes = (16, 20, 24)
    a = train_transform(image, boxes, np.random.default_rng(7), short_sizes=sizes, max_size=100)
    b = train_transform(image, boxes, np.random.default_rng(7), short_sizes=sizes, max_size=100)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    seen_short, seen_flip = set(), set()
    rng = np.random.default_rng(1)
    transform = pickle.loads(pickle.dumps(TrainTransform(short_sizes=sizes, max_size=100)))
    for _ in range(60):
        out, out_boxes = transform(image, boxes, rng)
        seen_short.add(min(out.shape[:2]))
        s = out.shape[1] / 40
        seen_flip.add(bool(np.isclose(out_boxes[0, 0], out.shape[1] - 11 * s, atol=1e-4)))
    assert seen_short == set(sizes)
    assert seen_flip == {False, True}


def test_collate_pads_to_batch_max() -> None:
    a = np.full((3, 5, 3), 7, np.uint8)
    b = np.full((4, 2, 3), 9, np.uint8)
    ta = {
        "boxes": np.array([[0, 0, 1, 1]], np.float32),
        "labels": np.array([2]),
        "image_id": 11,
        "orig_hw": (6, 10),
    }
    tb = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int64),
        "image_id": 3,
        "orig_hw": (4, 2),
    }
    batch = collate_detection([(a, ta), (b, tb)])
    assert batch.images.shape == (2, 3, 4, 5) and batch.images.dtype == torch.float32
    assert batch.images[0, :, :3, :5].eq(7).all() and batch.images[0, :, 3:].eq(0).all()
    assert batch.images[1, :, :, :2].eq(9).all() and batch.images[1, :, :, 2:].eq(0).all()
    assert batch.image_hw.tolist() == [[3, 5], [4, 2]]
    assert batch.orig_hw.tolist() == [[6, 10], [4, 2]]
    assert batch.image_ids == [11, 3]
    assert batch.targets[0].labels.dtype == torch.int64 and batch.targets[1].boxes.shape == (0, 4)
    _, im_info, gt = to_megengine_inputs(batch)
    assert im_info.tolist() == [[3, 5, 6, 10, 1], [4, 2, 4, 2, 0]]
    assert gt.tolist() == [[[0, 0, 1, 1, 3]], [[0, 0, 0, 0, 0]]]
    with pytest.raises(ValueError):
        collate_detection([])

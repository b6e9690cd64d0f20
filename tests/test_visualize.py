from __future__ import annotations

import numpy as np
import pytest
import torch

from atssdet.config import COCO_CLASSES
from atssdet.structures import Detections
from atssdet.visualize import DRAW_SCORE_THRESHOLD, class_color, draw, draw_detections, save_detections


def test_class_colors_are_distinct_for_all_coco_classes() -> None:
    colors = {class_color(i) for i in range(80)}
    assert len(colors) == 80
    assert all(0 <= c <= 255 for color in colors for c in color)


def test_class_zero_box_is_drawn() -> None:
    # The seed's vis_det skipped label 0 ("person"); here a crafted class-0 detection must be drawn.
    image = np.full((120, 160, 3), 128, dtype=np.uint8)
    dets = Detections(
        boxes=torch.tensor([[20.0, 40.0, 120.0, 100.0]]),
        scores=torch.tensor([0.9]),
        labels=torch.tensor([0]),
        class_names=COCO_CLASSES,
        image=image,
    )
    drawn = draw(dets, thickness=1)
    color = np.array(class_color(0), dtype=np.uint8)
    assert (image == 128).all(), "plot must not draw on the caller's image"
    # Left and right edges at mid-height, bottom edge at mid-width: exactly the class-0 colour.
    for y, x in ((70, 20), (70, 120), (100, 70)):
        np.testing.assert_array_equal(drawn[y, x], color)
    # Inside and outside the box the image is untouched.
    np.testing.assert_array_equal(drawn[70, 70], [128, 128, 128])
    np.testing.assert_array_equal(drawn[110, 150], [128, 128, 128])
    # The caption "person 0.90" sits above the box, on a class-coloured background.
    caption = drawn[:40, 20:120]
    assert (caption == color).all(axis=-1).sum() > 50


def test_score_threshold_and_colours_per_class() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    drawn = draw_detections(
        image,
        np.array([[10, 30, 40, 60], [60, 30, 90, 60]], dtype=np.float32),
        np.array([0.8, 0.2]),
        np.array([3, 5]),
        COCO_CLASSES,
        score_threshold=0.5,
        thickness=1,
    )
    np.testing.assert_array_equal(drawn[45, 10], class_color(3))
    np.testing.assert_array_equal(drawn[45, 60], [0, 0, 0])  # below the threshold: not drawn


def test_grey_image_and_save(tmp_path) -> None:
    grey = np.full((50, 60), 200, dtype=np.uint8)
    dets = Detections(torch.tensor([[5.0, 25.0, 30.0, 45.0]]), torch.tensor([0.7]), torch.tensor([0]))
    drawn = draw(dets, grey, thickness=1)
    assert drawn.shape == (50, 60, 3)
    np.testing.assert_array_equal(drawn[35, 5], class_color(0))
    out = save_detections(dets, tmp_path / "d.png", image=grey)
    import cv2

    np.testing.assert_array_equal(cv2.imread(str(out)), draw(dets, grey))
    assert [p.name for p in tmp_path.iterdir()] == ["d.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="no image to draw on"):
        draw(dets)


def test_api_and_cli_draw_the_same_boxes_by_default() -> None:
    """One drawing default (MegEngine's test_vis_threshold, 0.3): draw() leaves out a 0.2 box."""
    from atssdet.config import ATSSConfig

    assert DRAW_SCORE_THRESHOLD == ATSSConfig().test_vis_threshold == 0.3
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    dets = Detections(
        torch.tensor([[10.0, 30.0, 40.0, 60.0], [60.0, 30.0, 90.0, 60.0]]),
        torch.tensor([0.8, 0.2]),
        torch.tensor([3, 5]),
        image=image,
    )
    drawn = draw(dets, thickness=1)
    np.testing.assert_array_equal(drawn[45, 10], class_color(3))
    np.testing.assert_array_equal(drawn[45, 60], [0, 0, 0])

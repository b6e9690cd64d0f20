"""A stand-in Runner for hand-made images: each connected region of bright red pixels is one box.

The expected detections of a drawn image are then its rectangles, exactly (no network, no noise);
``batches`` records the batch size of every forward pass.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from atssdet.config import DEMO_PRESETS
from atssdet.structures import Detections

CFG = DEMO_PRESETS["atss_demo_cpu"]


class BlobRunner:
    """A Runner whose "model" boxes each connected region of bright red pixels; counts forwards.

    ``min_side``: regions narrower than this in the model's input are missed, like a real detector's
    smallest detectable object."""

    def __init__(self, min_side: int = 1) -> None:
        self.cfg = CFG
        self.device = torch.device("cpu")
        self.batches: list[int] = []
        self.min_side = min_side

    def detect(self, images, image_hw, orig_hw, options) -> list[Detections]:
        self.batches.append(len(images))
        out = []
        for img, hw, ohw in zip(images, image_hw.tolist(), orig_hw.tolist(), strict=True):
            h, w = int(hw[0]), int(hw[1])
            mask = (img[2, :h, :w] > 128).numpy().astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
            st = torch.tensor(stats[1:, :4], dtype=torch.float32).reshape(-1, 4)
            st = st[st[:, 2:].min(1).values >= self.min_side]
            boxes = torch.cat((st[:, :2], st[:, :2] + st[:, 2:]), 1)
            boxes *= torch.tensor([ohw[1] / w, ohw[0] / h] * 2)
            scores = 0.5 + st[:, 2:].min(1).values / 1000  # bigger blobs score higher (a stable order)
            out.append(Detections(boxes, scores, torch.zeros(len(st), dtype=torch.long)))
        return out

    def dense(self, images, image_hw, orig_hw):
        raise ValueError("blob runner: no dense outputs")


def blob_image(h: int, w: int, rects: list[tuple[int, int, int, int]]) -> np.ndarray:
    image = np.zeros((h, w, 3), np.uint8)
    for x1, y1, x2, y2 in rects:
        image[y1:y2, x1:x2, 2] = 255
    return image

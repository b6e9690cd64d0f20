"""Image/box transforms as plain functions on numpy arrays (images BGR uint8 ``[H, W, 3]``)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor


def get_hw_by_short_size(im_height: int, im_width: int, short_size: int, max_size: int) -> tuple[int, int]:
    """Resized (h, w): scale = short/min side, capped so the long side <= max; Python ``round`` (halves to even).

    Each side is at least 1 px: an extreme aspect ratio (a 1 x 10000 image capped to a 1333 long
    side) would otherwise round its short side to 0, which MegEngine's rule does and OpenCV refuses.
    """
    im_size_min = min(im_height, im_width)
    im_size_max = max(im_height, im_width)
    scale = (short_size + 0.0) / im_size_min
    if scale * im_size_max > max_size:
        scale = (max_size + 0.0) / im_size_max
    return max(1, int(round(im_height * scale))), max(1, int(round(im_width * scale)))


def resize_shortest_edge(image: np.ndarray, short_size: int, max_size: int) -> np.ndarray:
    """Resize like MegEngine: ``cv2.resize(INTER_LINEAR)`` on uint8 to :func:`get_hw_by_short_size`."""
    h, w = get_hw_by_short_size(image.shape[0], image.shape[1], short_size, max_size)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def images_to_batch(images: Sequence[np.ndarray], *, device: torch.device | str | None = None) -> Tensor:
    """Stack BGR uint8 ``[H_i, W_i, 3]`` images into float ``[N, 3, H_max, W_max]``, zero-padded bottom/right.

    The model pads further to /32 and normalises; raw pixels are padded with 0 as in MegEngine.
    """
    if not images:
        raise ValueError("images_to_batch needs at least one image")
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    batch = torch.zeros((len(images), 3, h, w), dtype=torch.float32, device=device)
    for i, im in enumerate(images):
        t = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).to(
            device=device, dtype=torch.float32
        )
        batch[i, :, : im.shape[0], : im.shape[1]] = t
    return batch


# --------------------------------------------------------------------------------------------------
# Training transforms (MegEngine tools/train.py: ShortestEdgeResize(sample_style="choice") then
# RandomHorizontalFlip(0.5)). Plain functions on (image BGR uint8 [H, W, 3], boxes float32 [M, 4] xyxy);
# randomness only through an explicit ``numpy.random.Generator`` so runs are reproducible.
# --------------------------------------------------------------------------------------------------


def get_train_hw_by_short_size(
    im_height: int, im_width: int, short_size: int, max_size: int
) -> tuple[int, int]:
    """Resized (h, w) exactly as MegEngine's training ``ShortestEdgeResize._get_shape`` computes it.

    The short side becomes ``short_size`` and the other side ``scale * side``; when the long side
    exceeds ``max_size`` both are multiplied by ``max_size / long``; then Python ``round`` (halves
    to even), each side at least 1 px (as :func:`get_hw_by_short_size`). This equals
    :func:`get_hw_by_short_size` except at rare float ties when the long side is capped (about 1 in
    10,000 size pairs, +-1 px), so training uses this one for parity.
    """
    scale = short_size / min(im_height, im_width)
    th: float
    tw: float
    if im_height < im_width:
        th, tw = float(short_size), scale * im_width
    else:
        th, tw = scale * im_height, float(short_size)
    if max(th, tw) > max_size:
        cap = max_size / max(th, tw)
        th, tw = th * cap, tw * cap
    return max(1, int(round(th))), max(1, int(round(tw)))


def choose_short_size(short_sizes: Sequence[int], rng: np.random.Generator) -> int:
    """Pick one training short side uniformly from ``short_sizes`` (MegEngine ``sample_style="choice"``)."""
    if len(short_sizes) == 0:
        raise ValueError("short_sizes must not be empty")
    return int(short_sizes[int(rng.integers(len(short_sizes)))])


def resize_image_and_boxes(
    image: np.ndarray, boxes_xyxy: np.ndarray, out_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``image`` [H, W, 3] uint8 to ``out_hw`` (cv2 INTER_LINEAR) and scale ``boxes_xyxy`` [M, 4].

    Boxes become ``x * (w / W)``, ``y * (h / H)`` computed in float32 (the ratio is rounded to
    float32 first, as numpy does for a float32 array times a Python float in MegEngine's transform).
    """
    in_h, in_w = image.shape[:2]
    out_h, out_w = out_hw
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    if (in_h, in_w) == (out_h, out_w):
        return image, boxes.copy()
    resized = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    ratio = np.array([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h], dtype=np.float32)
    return resized, boxes * ratio


def hflip_image_and_boxes(image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror ``image`` [H, W, 3] left-right; boxes [M, 4] get ``x' = W - x`` with x1/x2 swapped (no -1)."""
    w = np.float32(image.shape[1])
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    flipped_boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    return np.ascontiguousarray(image[:, ::-1]), flipped_boxes.astype(np.float32, copy=False)


def train_transform(
    image: np.ndarray,
    boxes_xyxy: np.ndarray,
    rng: np.random.Generator,
    *,
    short_sizes: Sequence[int],
    max_size: int,
    flip_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Random shortest-edge resize (choice among ``short_sizes``, long side <= ``max_size``) then random flip.

    Draws exactly two numbers from ``rng`` per call (size index, flip) in that order.
    Returns (image uint8 [h, w, 3], boxes float32 [M, 4] xyxy in resized pixels).
    """
    short = choose_short_size(short_sizes, rng)
    flip = bool(rng.random() < flip_prob)
    out_hw = get_train_hw_by_short_size(image.shape[0], image.shape[1], short, max_size)
    image, boxes = resize_image_and_boxes(image, boxes_xyxy, out_hw)
    if flip:
        image, boxes = hflip_image_and_boxes(image, boxes)
    return image, boxes


class TrainTransform:
    """Picklable training transform for :class:`atssdet.data.coco.COCODetection` (DataLoader workers).

    ``TrainTransform(short_sizes=cfg.train_image_short_size, max_size=cfg.train_image_max_size)``;
    called as ``transform(image, boxes_xyxy, rng)``.
    """

    def __init__(self, *, short_sizes: Sequence[int], max_size: int, flip_prob: float = 0.5) -> None:
        self.short_sizes = tuple(int(s) for s in short_sizes)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        choose_short_size(self.short_sizes, np.random.default_rng(0))  # validates non-empty

    def __call__(
        self, image: np.ndarray, boxes_xyxy: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return train_transform(
            image,
            boxes_xyxy,
            rng,
            short_sizes=self.short_sizes,
            max_size=self.max_size,
            flip_prob=self.flip_prob,
        )

    def __repr__(self) -> str:
        return f"TrainTransform(short_sizes={self.short_sizes}, max_size={self.max_size}, flip_prob={self.flip_prob})"

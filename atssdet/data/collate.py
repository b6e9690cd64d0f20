"""Collating detection samples into a batch (a top-level function: picklable for DataLoader workers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from atssdet.data.coco import DetectionTarget
from atssdet.data.transforms import images_to_batch


@dataclass
class BatchTarget:
    """Targets of one image as tensors: ``boxes`` float32 [M, 4] xyxy (input pixels), ``labels`` int64 [M] in 0..C-1."""

    boxes: Tensor
    labels: Tensor
    image_id: int


@dataclass
class DetectionBatch:
    """A padded batch.

    images: float32 [N, 3, H, W] raw BGR 0-255, zero-padded bottom/right to the batch maximum (the model pads to /32).
    targets: N :class:`BatchTarget`.
    image_hw: int64 [N, 2] size of each image inside ``images`` (after the transform, before padding).
    orig_hw: int64 [N, 2] size of each image on disk.
    image_ids: N COCO image ids.
    """

    images: Tensor
    targets: list[BatchTarget]
    image_hw: Tensor
    orig_hw: Tensor
    image_ids: list[int]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> DetectionBatch:
        targets = [
            BatchTarget(
                t.boxes.to(device, non_blocking=non_blocking),
                t.labels.to(device, non_blocking=non_blocking),
                t.image_id,
            )
            for t in self.targets
        ]
        return DetectionBatch(
            self.images.to(device, non_blocking=non_blocking),
            targets,
            self.image_hw.to(device, non_blocking=non_blocking),
            self.orig_hw.to(device, non_blocking=non_blocking),
            list(self.image_ids),
        )

    def pin_memory(self) -> DetectionBatch:
        """Called by ``DataLoader(pin_memory=True)``."""
        targets = [BatchTarget(t.boxes.pin_memory(), t.labels.pin_memory(), t.image_id) for t in self.targets]
        return DetectionBatch(
            self.images.pin_memory(),
            targets,
            self.image_hw.pin_memory(),
            self.orig_hw.pin_memory(),
            self.image_ids,
        )


def collate_detection(samples: Sequence[tuple[np.ndarray, DetectionTarget]]) -> DetectionBatch:
    """Batch ``(image uint8 [H_i, W_i, 3], target)`` pairs from :class:`atssdet.data.coco.COCODetection`."""
    if len(samples) == 0:
        raise ValueError("collate_detection needs at least one sample")
    images = [image for image, _ in samples]
    targets = [
        BatchTarget(
            torch.from_numpy(np.ascontiguousarray(t["boxes"], dtype=np.float32).reshape(-1, 4)),
            torch.from_numpy(np.ascontiguousarray(t["labels"], dtype=np.int64).reshape(-1)),
            int(t["image_id"]),
        )
        for _, t in samples
    ]
    return DetectionBatch(
        images=images_to_batch(images),
        targets=targets,
        image_hw=torch.tensor([image.shape[:2] for image in images], dtype=torch.int64),
        orig_hw=torch.tensor([t["orig_hw"] for _, t in samples], dtype=torch.int64),
        image_ids=[int(t["image_id"]) for _, t in samples],
    )

"""The training DataLoader (grouped, infinite, resumable), optionally skipping unreadable images.

Evaluation reads its images itself (:mod:`atssdet.evaluation.loop`), in size-planned batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from atssdet.data.coco import COCODetection, DetectionTarget
from atssdet.data.coco_records import DatasetError
from atssdet.data.collate import DetectionBatch, collate_detection
from atssdet.data.image_io import ImageReadError
from atssdet.data.sampler import GroupedBatchSampler


def build_train_loader(
    dataset: COCODetection,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
    start_batch: int = 0,
    pin_memory: bool = False,
    skip_unreadable: bool = False,
) -> DataLoader:
    """Infinite loader of :class:`~atssdet.data.collate.DetectionBatch` (``batch_size`` images per rank).

    Aspect-ratio grouped batches (MegEngine train.py); each rank reads a disjoint share of every
    epoch; augmentation is seeded per sample, so the stream depends only on (seed, rank, world_size)
    and ``start_batch`` resumes it exactly, whatever ``num_workers`` is. Give the dataset a
    :class:`~atssdet.data.transforms.TrainTransform`. With ``skip_unreadable`` each batch is
    ``(DetectionBatch or None, [reasons])``: images that fail to read (or mismatch their JSON entry)
    are left out and their reasons returned, so a trainer can count them and go on.
    """
    sampler = GroupedBatchSampler(
        dataset.aspect_ratios(),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        infinite=True,
        start_batch=start_batch,
    )
    return DataLoader(
        SkipUnreadable(dataset) if skip_unreadable else dataset,
        batch_sampler=sampler,
        collate_fn=collate_skipping if skip_unreadable else collate_detection,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


@dataclass(frozen=True)
class _Unreadable:
    image_id: int
    reason: str


class SkipUnreadable(Dataset):
    """``dataset[key]`` or an :class:`_Unreadable` marker when the image cannot be read or mismatches its JSON entry."""

    def __init__(self, dataset: COCODetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> tuple[np.ndarray, DetectionTarget] | _Unreadable:
        try:
            return self.dataset[key]
        except (ImageReadError, DatasetError) as exc:
            index = int(key[0]) if isinstance(key, tuple) else int(key)
            return _Unreadable(self.dataset.image_info(index).image_id, str(exc))


def collate_skipping(samples: Sequence[Any]) -> tuple[DetectionBatch | None, list[str]]:
    """:func:`collate_detection` over the readable samples, plus the reasons of the unreadable ones."""
    good = [s for s in samples if not isinstance(s, _Unreadable)]
    bad = [s.reason for s in samples if isinstance(s, _Unreadable)]
    return (collate_detection(good) if good else None), bad

"""DataLoaders for training (grouped, infinite, resumable) and inference (sharded, ordered)."""

from __future__ import annotations

from torch.utils.data import BatchSampler, DataLoader

from atssdet.data.coco import COCODetection
from atssdet.data.collate import collate_detection
from atssdet.data.sampler import GroupedBatchSampler, InferenceSampler


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
) -> DataLoader:
    """Infinite loader of :class:`~atssdet.data.collate.DetectionBatch` (``batch_size`` images per rank).

    Aspect-ratio grouped batches (MegEngine train.py); each rank reads a disjoint share of every
    epoch; augmentation is seeded per sample, so the stream depends only on (seed, rank, world_size)
    and ``start_batch`` resumes it exactly, whatever ``num_workers`` is. Give the dataset a
    :class:`~atssdet.data.transforms.TrainTransform`.
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
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_detection,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def build_eval_loader(
    dataset: COCODetection,
    *,
    batch_size: int = 1,
    num_workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """Loader over this rank's contiguous shard of ``dataset``, in dataset order, every image once.

    Gather the per-rank outputs and :func:`~atssdet.data.sampler.merge_shards` them in rank order to
    get dataset order back. Give the dataset an :class:`~atssdet.data.transforms.EvalTransform`
    (or none, and resize in the model wrapper).
    """
    indices = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(indices, batch_size, drop_last=False),
        collate_fn=collate_detection,
        num_workers=num_workers,
    )

"""The training batch sampler: aspect-ratio grouped batches, sharded across ranks, resumable.

Training follows MegEngine/Models ``tools/train.py`` (``GroupedRandomSampler`` inside ``Infinite``):
images are split into two groups, ``h / w < 1`` and ``h / w >= 1`` (``bisect_right([1], ratio)``),
each epoch walks a fresh permutation, every rank keeps its own slice of it, and an index waits in its
group's buffer until the buffer holds a full batch; buffers carry over into the next epoch.

Each yielded item is ``(index, seed)``: the dataset seeds the augmentation of that sample with
``seed``, so a run is reproducible whatever the number of DataLoader workers, and resuming at
batch ``k`` (``start_batch=k``) replays the exact same sequence.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def default_rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill missing ``rank`` / ``world_size`` from torch.distributed when initialised, else (0, 1)."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def aspect_ratio_group_ids(
    aspect_ratios: Sequence[float] | np.ndarray, bins: Sequence[float] = (1.0,)
) -> np.ndarray:
    """Group id per image from ``h / w``: with the default bins, 0 for ``h/w < 1`` and 1 for ``h/w >= 1``."""
    edges = sorted(bins)
    return np.array([bisect.bisect_right(edges, float(r)) for r in aspect_ratios], dtype=np.int64)


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Aspect-ratio grouped random batches of ``(index, seed)`` for one rank.

    Args:
        aspect_ratios: ``h / w`` of every dataset item (``COCODetection.aspect_ratios()``).
        batch_size: images per batch on this rank.
        seed: base seed; the permutation of epoch ``e`` and every augmentation seed derive from it.
        rank, world_size: this rank's shard (default: from torch.distributed if initialised, else 0, 1).
            Within an epoch ranks get disjoint images: rank r takes positions r, r + W, ... of the
            epoch's permutation, truncated to a multiple of W so every rank sees as many images.
        infinite: True (training default): never stops, buffers carry over epochs as in MegEngine.
            False: one epoch (choose it with :meth:`set_epoch`); leftover partial batches are
            dropped unless ``drop_last=False``.
        start_batch: skip this many batches first (resume; infinite mode only); cheap, no data read.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        infinite: bool = True,
        drop_last: bool = True,
        start_batch: int = 0,
        group_bins: Sequence[float] = (1.0,),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.group_ids = aspect_ratio_group_ids(aspect_ratios, group_bins)
        if len(self.group_ids) == 0:
            raise ValueError("GroupedBatchSampler needs a non-empty dataset")
        self.rank, self.world_size = default_rank_and_world_size(rank, world_size)
        if len(self.group_ids) < self.world_size:
            raise ValueError(f"{len(self.group_ids)} images cannot be sharded over {self.world_size} ranks")
        self.batch_size = batch_size
        self.seed = seed
        self.infinite = infinite
        self.drop_last = drop_last
        self.start_batch = start_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (permutation) that a finite sampler walks next."""
        self.epoch = epoch

    def epoch_indices(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's ``(index, seed)`` sequence for ``epoch``, before grouping."""
        n = len(self.group_ids)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        # One augmentation seed per position of the global permutation: distinct across ranks.
        seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**63 - 1, size=n, dtype=np.int64)
        usable = n - n % self.world_size
        return list(
            zip(
                perm[self.rank : usable : self.world_size].tolist(),
                seeds[self.rank : usable : self.world_size].tolist(),
                strict=True,
            )
        )

    def _batches(self) -> Iterator[list[tuple[int, int]]]:
        buffers: dict[int, list[tuple[int, int]]] = {}
        epoch = self.epoch
        while True:
            for key in self.epoch_indices(epoch):
                group = int(self.group_ids[key[0]])
                buf = buffers.setdefault(group, [])
                buf.append(key)
                if len(buf) == self.batch_size:
                    yield buf
                    buffers[group] = []
            if not self.infinite:
                if not self.drop_last:
                    for group in sorted(buffers):
                        if buffers[group]:
                            yield buffers[group]
                return
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self._batches()
        if self.infinite:
            for _ in range(self.start_batch):
                next(batches)
        return batches

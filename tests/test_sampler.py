"""Grouped batch sampler: grouping, disjoint/complete shards, determinism, resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from atssdet.data.sampler import GroupedBatchSampler, aspect_ratio_group_ids

RATIOS = np.array([0.5, 1.0, 1.5, 0.75, 0.99, 2.0, 1.0, 0.3, 1.2, 0.8, 0.6, 1.1, 0.9])  # 13 images


def test_group_ids_split_at_one() -> None:
    assert aspect_ratio_group_ids([0.5, 0.999, 1.0, 1.7]).tolist() == [0, 0, 1, 1]


def _take(sampler: GroupedBatchSampler, n: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(iter(sampler), n))


def test_batches_never_mix_groups_and_are_deterministic() -> None:
    groups = aspect_ratio_group_ids(RATIOS)
    sampler = GroupedBatchSampler(RATIOS, 2, seed=3, rank=0, world_size=1)
    batches = _take(sampler, 40)
    for batch in batches:
        assert len(batch) == 2
        assert len({int(groups[i]) for i, _ in batch}) == 1
    assert batches == _take(GroupedBatchSampler(RATIOS, 2, seed=3, rank=0, world_size=1), 40)
    assert batches != _take(GroupedBatchSampler(RATIOS, 2, seed=4, rank=0, world_size=1), 40)
    seeds = [s for batch in batches for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # every sample gets its own augmentation seed


def test_resume_replays_the_same_sequence() -> None:
    full = _take(GroupedBatchSampler(RATIOS, 3, seed=1, rank=0, world_size=1), 30)
    resumed = _take(GroupedBatchSampler(RATIOS, 3, seed=1, rank=0, world_size=1, start_batch=17), 13)
    assert resumed == full[17:]


def test_ranks_get_disjoint_images_each_epoch() -> None:
    world = 3
    per_rank = [
        GroupedBatchSampler(RATIOS, 2, seed=5, rank=r, world_size=world).epoch_indices(epoch=2)
        for r in range(world)
    ]
    indices = [[i for i, _ in keys] for keys in per_rank]
    assert all(len(ix) == 13 // world for ix in indices)  # equal share, tail of 1 dropped
    flat = [i for ix in indices for i in ix]
    assert len(set(flat)) == len(flat) == 12
    seeds = [s for keys in per_rank for _, s in keys]
    assert len(set(seeds)) == len(seeds)


def test_finite_epoch_mode() -> None:
    sampler = GroupedBatchSampler(RATIOS, 2, seed=0, rank=0, world_size=1, infinite=False, drop_last=False)
    sampler.set_epoch(1)
    batches = list(sampler)
    flat = sorted(i for batch in batches for i, _ in batch)
    assert flat == list(range(13))  # every image exactly once, partial leftovers kept
    sampler.drop_last = True
    assert all(len(b) == 2 for b in sampler)
    sampler.set_epoch(2)
    assert list(sampler) != batches


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        GroupedBatchSampler(RATIOS, 2, rank=3, world_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler(RATIOS, 0)
    with pytest.raises(ValueError, match="sharded"):
        GroupedBatchSampler(RATIOS[:2], 1, rank=0, world_size=3)


def test_dataloader_workers_reproducible(tmp_path) -> None:
    """COCODetection + GroupedBatchSampler + collate in 2 workers == in-process, batch for batch."""
    from atssdet import distributed
    from atssdet.data.coco import COCODetection
    from atssdet.data.loader import build_train_loader
    from atssdet.data.synth import generate_synthetic_dataset
    from atssdet.data.transforms import TrainTransform

    out = generate_synthetic_dataset(
        tmp_path, num_train=6, num_val=0, image_size=(48, 80), progress=False, log=lambda _: None
    )
    ds = COCODetection(
        out.train_ann,
        out.train_images,
        remove_images_without_annotations=True,
        transform=TrainTransform(short_sizes=(40, 48, 56), max_size=100),
    )

    def run(workers: int, start_batch: int = 0) -> list:
        loader = build_train_loader(
            ds, batch_size=2, seed=9, num_workers=workers, rank=0, world_size=1, start_batch=start_batch
        )
        return list(itertools.islice(iter(loader), 5 - start_batch))

    in_process, in_workers = run(0), run(2)
    resumed = run(0, start_batch=3)
    assert [b.image_ids for b in resumed] == [b.image_ids for b in in_process[3:]]
    assert resumed[0].images.equal(in_process[3].images)
    for a, b in zip(in_process, in_workers, strict=True):
        assert a.image_ids == b.image_ids
        assert a.images.shape[0] == 2 and a.images.equal(b.images)
        assert all(ta.boxes.equal(tb.boxes) for ta, tb in zip(a.targets, b.targets, strict=True))
        assert (a.image_hw.min(dim=1).values >= 40).all()

    val = COCODetection(out.train_ann, out.train_images, remove_images_without_annotations=False)
    # Evaluation shards the sorted image ids across ranks (evaluation.loop): every image exactly once.
    shards = [distributed.shard(val.image_ids, rank=r, world_size=4) for r in range(4)]
    assert sorted(i for ids in shards for i in ids) == val.image_ids

"""train.data.samplers: training partitions across ranks, determinism, resume, and validation
batches that count every image exactly once with equal batch counts per rank."""

from __future__ import annotations

import numpy as np
import pytest

from train.data.samplers import (
    TrainBatchSampler,
    center_val_batches,
    deal_batches,
    epoch_permutation,
    rect_val_batches,
    sample_seed,
)


def rank_batches(num_images, batch_size, world_size, seed=0, epoch=0):
    per_rank = []
    for rank in range(world_size):
        sampler = TrainBatchSampler(
            num_images, batch_size, rank=rank, world_size=world_size, seed=seed
        )
        sampler.set_epoch(epoch)
        per_rank.append([batch.indices.tolist() for batch in sampler])
    return per_rank


@pytest.mark.parametrize(
    "num_images,batch_size,world_size", [(100, 8, 1), (103, 4, 3), (18, 2, 4), (64, 8, 8)]
)
def test_train_ranks_are_disjoint_equal_and_full(num_images, batch_size, world_size):
    per_rank = rank_batches(num_images, batch_size, world_size)
    expected_batches = num_images // (batch_size * world_size)
    seen = []
    for batches in per_rank:
        assert len(batches) == expected_batches
        assert all(len(batch) == batch_size for batch in batches)
        seen += [index for batch in batches for index in batch]
    assert len(seen) == len(set(seen)) == expected_batches * batch_size * world_size
    assert set(seen) <= set(range(num_images))


def test_ranks_slice_the_single_process_global_batch():
    """Rank r's batch b is rows [r*B, (r+1)*B) of a single process's batch b of size W*B, at
    the same permutation positions: DDP and one big process see the same samples."""
    world_size, batch_size = 3, 4
    single = TrainBatchSampler(50, batch_size * world_size, seed=7)
    for rank in range(world_size):
        sampler = TrainBatchSampler(50, batch_size, rank=rank, world_size=world_size, seed=7)
        for batch, global_batch in zip(sampler, single):
            rows = slice(rank * batch_size, (rank + 1) * batch_size)
            assert batch.indices.tolist() == global_batch.indices[rows].tolist()
            assert batch.first_position == global_batch.first_position + rank * batch_size


def test_epochs_reshuffle_deterministically():
    assert rank_batches(40, 4, 2, seed=1, epoch=3) == rank_batches(40, 4, 2, seed=1, epoch=3)
    assert rank_batches(40, 4, 2, seed=1, epoch=3) != rank_batches(40, 4, 2, seed=1, epoch=4)
    assert rank_batches(40, 4, 2, seed=1, epoch=3) != rank_batches(40, 4, 2, seed=2, epoch=3)
    assert sorted(epoch_permutation(40, 1, 3).tolist()) == list(range(40))


def test_resume_inside_an_epoch_replays_the_tail():
    sampler = TrainBatchSampler(100, 8, rank=1, world_size=2, seed=5)
    sampler.set_epoch(2)
    full = [(batch.batch, batch.indices.tolist(), batch.first_position) for batch in sampler]
    sampler.set_epoch(2, start_batch=4)
    tail = [(batch.batch, batch.indices.tolist(), batch.first_position) for batch in sampler]
    assert tail == full[4:] and len(sampler) == 6
    assert [
        (b.batch, b.indices.tolist(), b.first_position) for b in sampler
    ] == tail  # until next set_epoch
    sampler.set_epoch(2, start_batch=len(sampler))
    assert list(sampler) == []
    with pytest.raises(ValueError):
        sampler.set_epoch(2, start_batch=7)


def test_sample_seeds_are_distinct():
    seeds = {
        sample_seed(seed, epoch, position)
        for seed in (0, 1, 2**31)
        for epoch in range(3)
        for position in range(100)
    }
    assert len(seeds) == 900


def test_bad_train_sampler_arguments():
    with pytest.raises(ValueError, match="fill no global batch"):
        TrainBatchSampler(10, 4, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        TrainBatchSampler(10, 2, rank=2, world_size=2)


def test_deal_pads_with_empty_batches():
    assert deal_batches(list("abcde"), 0, 2) == ["a", "c", "e"]
    assert deal_batches(list("abcde"), 1, 2) == ["b", "d", None]
    assert deal_batches(list("ab"), 2, 3) == [None]


@pytest.mark.parametrize("rect", [False, True])
@pytest.mark.parametrize(
    "num_images,batch_size,world_size", [(13, 4, 2), (13, 4, 3), (13, 4, 5), (3, 4, 2), (16, 4, 4)]
)
def test_val_counts_every_image_once(rect, num_images, batch_size, world_size):
    ratios = np.random.default_rng(0).uniform(0.5, 2.0, num_images)
    seen, lengths = [], set()
    for rank in range(world_size):
        if rect:
            batches = rect_val_batches(ratios, batch_size, rank=rank, world_size=world_size)
        else:
            batches = center_val_batches(num_images, batch_size, rank=rank, world_size=world_size)
        lengths.add(len(batches))
        for batch in batches:
            assert batch.indices.dtype == np.int64 and len(batch.indices) <= batch_size
            seen += batch.indices.tolist()
            if rect and len(batch.indices):
                assert batch.aspect_ratio == pytest.approx(ratios[batch.indices].mean())
    assert lengths == {-(-(-(-num_images // batch_size)) // world_size)}
    assert sorted(seen) == list(range(num_images))


def test_rect_batches_group_aspect_ratio_neighbours():
    ratios = [1.5, 0.7, 1.33, 0.75, 1.0, 1.78, 0.8, 1.25]
    batches = rect_val_batches(ratios, 4)
    assert [sorted(batch.indices.tolist()) for batch in batches] == [[1, 3, 4, 6], [0, 2, 5, 7]]

"""train.data.samplers with repeat_aug: DeiT/torchvision RASampler semantics (each sampled image
N times per epoch, copies on different ranks, epoch length kept), a position -> record map
independent of the world size, and repeat_aug 1 exactly as before."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from train.data.crops import TrainCrop
from train.data.samplers import (
    SampleKeys,
    TrainBatchSampler,
    TrainPlan,
    epoch_permutation,
    sample_seed,
    sample_uniforms,
)

NUM_IMAGES, GLOBAL_BATCH, REPEAT = 72, 12, 3  # 72 positions: 6 global micro-batches of 12


def epoch_batches(world_size, repeat_aug=REPEAT, num_images=NUM_IMAGES, epoch=1, seed=4):
    """{rank: [TrainBatchIndices, ...]} for one epoch at the same global batch."""
    out = {}
    for rank in range(world_size):
        sampler = TrainBatchSampler(
            num_images,
            GLOBAL_BATCH // world_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            repeat_aug=repeat_aug,
        )
        sampler.set_epoch(epoch)
        out[rank] = list(sampler)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_sampled_image_n_times_and_epoch_length_kept(world_size):
    batches = epoch_batches(world_size)
    records = [i for rank in batches.values() for b in rank for i in b.indices.tolist()]
    plain = [i for r in epoch_batches(world_size, 1).values() for b in r for i in b.indices]
    assert len(records) == len(plain) == NUM_IMAGES  # the epoch's images, as without repeats
    counts = Counter(records)
    assert set(counts.values()) == {REPEAT} and len(counts) == NUM_IMAGES // REPEAT
    # which images: the first num_images / N of the epoch's permutation (seed and epoch only)
    assert set(counts) == set(epoch_permutation(NUM_IMAGES, 4, 1)[: NUM_IMAGES // REPEAT].tolist())


@pytest.mark.parametrize("world_size", [3, 4])
def test_copies_land_on_different_ranks_when_world_size_reaches_n(world_size):
    ranks_of = {}
    for rank, rank_batches in epoch_batches(world_size).items():
        for batch in rank_batches:
            for record in batch.indices.tolist():
                ranks_of.setdefault(record, []).append(rank)
    assert all(len(set(ranks)) == REPEAT == len(ranks) for ranks in ranks_of.values())
    # ... and with fewer ranks than copies, each rank holds at most ceil(N / W) of them
    for rank_lists in [epoch_batches(2)]:
        per_record = Counter(
            (record, rank)
            for rank, rank_batches in rank_lists.items()
            for batch in rank_batches
            for record in batch.indices.tolist()
        )
        assert max(per_record.values()) == 2


def test_a_steps_positions_and_records_do_not_depend_on_world_size():
    """The elastic-resume contract: global micro-batch b is positions [b*G, (b+1)*G) whatever
    W, and each position holds the same record (and so the same draws) under every W."""
    by_world = {}
    for world_size in (1, 2, 3, 4):
        steps = []
        for step in range(NUM_IMAGES // GLOBAL_BATCH):
            pairs = set()
            for rank_batches in epoch_batches(world_size).values():
                batch = rank_batches[step]
                pairs |= set(zip(batch.positions.tolist(), batch.indices.tolist()))
            assert {p for p, _ in pairs} == set(
                range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
            )
            steps.append(pairs)
        by_world[world_size] = steps
    assert by_world[1] == by_world[2] == by_world[3] == by_world[4]


def test_each_copy_gets_its_own_draws():
    """Copies of a record sit at different positions: different crops, flips and seeds."""
    (batch,) = epoch_batches(1, num_images=GLOBAL_BATCH)[0]
    plan = TrainPlan(batch, TrainCrop(32), seed=4)
    heights, widths = np.full(NUM_IMAGES, 300), np.full(NUM_IMAGES, 400)
    boxes, _ = plan.boxes_and_flips(heights, widths)
    first = batch.indices[0]
    copies = np.flatnonzero(batch.indices == first)
    assert len(copies) == REPEAT
    assert len({tuple(boxes[c]) for c in copies}) == REPEAT
    assert len(set(plan.sample_seeds()[int(c)] for c in copies)) == REPEAT


def test_repeat_aug_1_keeps_todays_order_and_draws():
    """Contiguous slices, positions first_position + i, draws keyed the way they always were."""
    sampler = TrainBatchSampler(50, 4, rank=1, world_size=3, seed=7)
    sampler.set_epoch(2)
    permutation = epoch_permutation(50, 7, 2)
    for batch in sampler:
        first = (batch.batch * 3 + 1) * 4
        assert batch.first_position == first
        assert batch.positions.tolist() == list(range(first, first + 4))
        assert batch.indices.tolist() == permutation[first : first + 4].tolist()
        keys = TrainPlan(batch, TrainCrop(16), 7).sample_seeds()
        assert list(keys) == [sample_seed(7, 2, first + i) for i in range(4)]
        assert np.array_equal(keys.uniforms(0, 23), sample_uniforms(7, 2, first, 4, 23))


def test_resume_mid_epoch_replays_the_same_tail():
    sampler = TrainBatchSampler(60, 5, rank=1, world_size=2, seed=3, repeat_aug=4)
    sampler.set_epoch(0)
    full = [(b.indices.tolist(), b.positions.tolist()) for b in sampler]
    sampler.set_epoch(0, start_batch=3)
    assert [(b.indices.tolist(), b.positions.tolist()) for b in sampler] == full[3:]


def test_keys_slice_and_draw_slots():
    keys = SampleKeys(1, 2, np.array([5, 9, 13]))
    assert list(keys[1:]) == [sample_seed(1, 2, 9), sample_seed(1, 2, 13)]
    assert np.array_equal(keys.uniforms(10, 3)[1], sample_uniforms(1, 2, 9, 1, 13)[0, 10:])
    with pytest.raises(ValueError, match="outside"):
        keys.uniforms(60, 5)
    with pytest.raises(ValueError, match="repeat_aug"):
        TrainBatchSampler(10, 2, repeat_aug=0)

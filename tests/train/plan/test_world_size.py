"""--global-batch keep|scale and the elastic-resume re-split (train.plan.world_size): pure."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from train.data.samplers import TrainBatchSampler
from train.errors import ScheduleError
from train.plan.schedule import Schedule
from train.plan.world_size import keep_global_batch, plan_world, resume_on, scale_lrs, split_batch


def schedule(*phases: dict) -> Schedule:
    base = {"prep_size": 160, "crop_size": 128, "batch_size": 128, "lr": [0.1, 0.2]}
    return Schedule.from_dicts(
        [{**base, "epochs": [i, i + 1], **phase} for i, phase in enumerate(phases)]
    )


def splits(plan_schedule: Schedule) -> list[tuple[int, int]]:
    return [(p.batch_size, p.accum_steps) for p in plan_schedule.phases]


@pytest.mark.parametrize(
    "batch_size,accum_steps,tuned,world,expected",
    [
        (128, 1, 8, 1, (128, 8)),  # fewer GPUs: the same per-forward batch, more accumulation
        (128, 2, 8, 2, (128, 8)),
        (256, 1, 1, 2, (128, 1)),  # more GPUs: a smaller per-GPU batch
        (256, 2, 1, 2, (256, 1)),  # ... or less accumulation, the per-forward batch as tuned
        (96, 1, 4, 3, (64, 2)),  # 128 per rank: 96 does not divide it, 64 x 2 does
        (7, 1, 2, 1, (7, 2)),
        (6, 1, 1, 4, None),  # 6 over 4 ranks: no whole per-rank share
        (1024, 1, 1, 3, None),
    ],
)
def test_split_batch(batch_size, accum_steps, tuned, world, expected) -> None:
    phase = schedule({"batch_size": batch_size, "accum_steps": accum_steps}).phases[0]
    assert split_batch(phase, tuned, world) == expected


def test_every_exact_split_keeps_the_global_batch_with_the_largest_forward_up_to_the_tuned():
    for batch_size, accum_steps, tuned, world in itertools.product(
        (1, 6, 12, 32), (1, 2, 3), (1, 2, 3, 8), (1, 2, 4, 5, 16)
    ):
        phase = schedule({"batch_size": batch_size, "accum_steps": accum_steps}).phases[0]
        total = batch_size * accum_steps * tuned
        split = split_batch(phase, tuned, world)
        if total % world:
            assert split is None
            continue
        forward, accum = split
        assert forward * accum * world == total and forward <= batch_size
        per_rank = total // world
        assert not any(per_rank % b == 0 for b in range(forward + 1, batch_size + 1))


def test_keep_refuses_in_one_line_with_the_nearest_world_sizes() -> None:
    tuned = schedule({"batch_size": 128}, {"batch_size": 96})  # 1024 and 768 on 8 GPUs
    with pytest.raises(ScheduleError) as raised:
        plan_world(tuned, 8, 5, "keep")
    assert str(raised.value) == (
        "--global-batch keep on 5 GPUs: phase 0's global batch 1024 (batch_size 128 x 8 ranks "
        "x accum_steps 1) does not split evenly over 5 ranks; nearest world sizes that keep "
        "it: 4 or 8"  # gcd(1024, 768) = 256: 4 and 8 split both phases
    )
    later = schedule({"batch_size": 96}, {"batch_size": 128})  # 768 splits over 3, 1024 not
    with pytest.raises(ScheduleError, match="^x: phase 1's global batch 1024 .*: 2 or 4$"):
        keep_global_batch(later, 8, 3, "x")


def test_keep_on_one_gpu_keeps_every_phase_and_says_how() -> None:
    tuned = schedule(
        {"batch_size": 128, "accum_steps": 1},
        {"batch_size": 64, "accum_steps": 2, "lr": [0.2, 0.0], "lr_shape": "cosine"},
    )
    plan = plan_world(tuned, 8, 1, "keep")
    assert splits(plan.schedule) == [(128, 8), (64, 16)]
    assert [p.lr for p in plan.schedule.phases] == [p.lr for p in tuned.phases]
    for before, after in zip(tuned.phases, plan.schedule.phases):  # only the split changed
        assert before.to_dict() | {"batch_size": 0, "accum_steps": 0} == after.to_dict() | {
            "batch_size": 0,
            "accum_steps": 0,
        }
    assert plan.lines == (
        "global batch 1024 kept on 1 GPU: phase 0: batch_size 128 x accum_steps 8; phase 1: "
        "batch_size 64 x accum_steps 16 (tuned for 8 GPUs: phase 0: batch_size 128 x "
        "accum_steps 1; phase 1: batch_size 64 x accum_steps 2); LRs unchanged",
    )


def test_scale_keeps_the_per_gpu_batch_and_scales_every_lr_linearly() -> None:
    tuned = schedule(
        {"lr": [0.0, 0.8]},  # a warm-up from 0
        {"lr": [0.8, 0.008], "lr_shape": "step"},
        {"lr": [0.4, 0.4], "lr_shape": "constant", "accum_steps": 2},
    )
    plan = plan_world(tuned, 8, 2, "scale")
    assert splits(plan.schedule) == splits(tuned)
    assert [p.lr for p in plan.schedule.phases] == [(0.0, 0.2), (0.2, 0.002), (0.1, 0.1)]
    step_before, step_after = tuned.phases[1], plan.schedule.phases[1]
    for epoch in range(*step_before.epochs):  # every LR the run asks for, scaled
        assert step_after.step_lr(epoch) == pytest.approx(step_before.step_lr(epoch) / 4)
    assert plan.lines == (
        "per-GPU batch kept on 2 GPUs: global batch 256, 512 instead of 1024, 2048, every LR "
        "x 2/8 (= 0.25, linear scaling)",
    )
    assert scale_lrs(tuned, 1.0) == tuned


def test_without_a_mode_the_schedule_is_unchanged_and_a_note_says_so() -> None:
    tuned = schedule({})
    plan = plan_world(tuned, 8, 1, None)
    assert plan.schedule == tuned
    assert plan.lines[0].startswith("note: this schedule's LRs were tuned for 8 GPUs (global ")
    assert "global batch is 128 at the same LRs" in plan.lines[0]
    for mode in (None, "keep", "scale"):  # as tuned: nothing to adapt
        same = plan_world(tuned, 8, 8, mode)
        assert same.schedule == tuned
        assert same.lines == ("global batch 1024 on 8 GPUs, as its LRs were tuned",)


def test_no_tuned_num_gpus_refuses_a_mode_and_is_silent_without_one() -> None:
    untuned = schedule({})
    assert plan_world(untuned, None, 4, None).schedule == untuned
    assert plan_world(untuned, None, 4, None).lines == ()
    for mode in ("keep", "scale"):
        with pytest.raises(ScheduleError, match=f"^--global-batch {mode}: the recipe has no tuned"):
            plan_world(untuned, None, 4, mode)


def test_resume_on_another_world_size_keeps_the_checkpoints_global_batch() -> None:
    two_ranks = schedule({"batch_size": 8})
    plan = resume_on(two_ranks, 2, 1)
    assert splits(plan.schedule) == [(8, 2)]
    assert plan.lines == (
        "resuming a 2-rank run on 1 rank: batch_size 8 x accum_steps 2 keeps the global batch 16",
    )
    assert resume_on(plan.schedule, 1, 2).schedule == two_ranks  # back: the original split
    assert resume_on(two_ranks, 2, 2) == type(plan)(two_ranks)  # same world: nothing
    with pytest.raises(
        ScheduleError, match="^resuming a 2-rank run on 3 ranks: phase 0's .*2 or 4"
    ):
        resume_on(two_ranks, 2, 3)


@pytest.mark.parametrize(
    "before,after", [((8, 1, 2), (8, 2, 1)), ((4, 1, 4), (8, 1, 2)), ((8, 1, 2), (2, 2, 4))]
)
def test_a_step_covers_the_same_records_whatever_the_split(before, after) -> None:
    """The claim elastic resume rests on (train.data.samplers): rank r's micro-batch b holds
    positions (b * W + r) * B ..., so optimizer step s with accumulation A covers positions
    [s * A * W * B, (s + 1) * A * W * B) of the epoch's permutation on any split, and a loader
    started at micro-batch s * A (set_epoch) continues at step s."""
    num_images, seed, epoch = 100, 3, 5

    def steps(batch_size, accum, world, start_step=0):
        samplers = [
            TrainBatchSampler(num_images, batch_size, rank=r, world_size=world, seed=seed)
            for r in range(world)
        ]
        per_step = []
        for sampler in samplers:
            sampler.set_epoch(epoch, start_step * accum)
            for i, batch in enumerate(sampler):
                step = start_step + i // accum
                while len(per_step) <= step - start_step:
                    per_step.append([])
                per_step[step - start_step].extend(batch.indices.tolist())
        return [sorted(s) for s in per_step if len(s) == batch_size * accum * world]

    whole = steps(*before)
    assert len(whole) == num_images // 16  # every whole step of the epoch, none dropped
    assert steps(*after) == whole
    assert steps(*after, start_step=2) == whole[2:]  # a resume mid-epoch on the other split
    seen = np.concatenate(whole)
    assert len(np.unique(seen)) == len(seen)  # each sample at most once an epoch

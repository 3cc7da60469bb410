"""A schedule on another GPU count: keep its global batch (batch_size x accum_steps re-split) or
keep the per-GPU batch and scale every LR; pure, with the lines that say what changed."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from train.errors import ScheduleError
from train.plan.schedule import Phase, Schedule


@dataclass(frozen=True)
class WorldPlan:
    """The schedule this world size trains, and what it changed, one line each."""

    schedule: Schedule
    lines: tuple[str, ...] = ()


def gpus(count: int) -> str:
    return f"{count} GPU" + ("" if count == 1 else "s")


def ranks(count: int) -> str:
    return f"{count} rank" + ("" if count == 1 else "s")


def global_batch(phase: Phase, world_size: int) -> int:
    return phase.batch_size * phase.accum_steps * world_size


def split_batch(phase: Phase, from_world: int, to_world: int) -> tuple[int, int] | None:
    """(batch_size, accum_steps) with `phase`'s global batch on `to_world` ranks: the largest
    per-forward batch up to the phase's own (more would need memory it was not tuned for),
    the rest as accumulation; None when the global batch does not divide by `to_world`."""
    total = global_batch(phase, from_world)
    if total % to_world:
        return None
    per_rank = total // to_world
    forward = next(b for b in range(min(phase.batch_size, per_rank), 0, -1) if per_rank % b == 0)
    return forward, per_rank // forward


def nearest_world_sizes(schedule: Schedule, from_world: int, to_world: int) -> list[int]:
    """The world sizes next to `to_world` (below, above) that split every phase exactly."""
    common = math.gcd(*(global_batch(p, from_world) for p in schedule.phases))
    below = next((w for w in range(to_world - 1, 0, -1) if common % w == 0), None)
    above = next((w for w in range(to_world + 1, common + 1) if common % w == 0), None)
    return [w for w in (below, above) if w is not None]


def keep_global_batch(schedule: Schedule, from_world: int, to_world: int, what: str) -> Schedule:
    """`schedule` (per-GPU numbers for `from_world` ranks) re-split for `to_world` ranks with
    every phase's global batch unchanged; `what` starts the one-line refusal."""
    phases = []
    for index, phase in enumerate(schedule.phases):
        split = split_batch(phase, from_world, to_world)
        if split is None:
            nearest = " or ".join(map(str, nearest_world_sizes(schedule, from_world, to_world)))
            raise ScheduleError(
                f"{what}: phase {index}'s global batch {global_batch(phase, from_world)} "
                f"(batch_size {phase.batch_size} x {ranks(from_world)} x accum_steps "
                f"{phase.accum_steps}) does not split evenly over {ranks(to_world)}; "
                f"nearest world sizes that keep it: {nearest}"
            )
        batch_size, accum_steps = split
        phases.append(dataclasses.replace(phase, batch_size=batch_size, accum_steps=accum_steps))
    return Schedule(tuple(phases))


def scale_lrs(schedule: Schedule, factor: float) -> Schedule:
    """Every phase's LR pair times `factor`: warm-ups, decays and every lr_shape keep their
    shape (a "step" phase keeps its per-epoch factor)."""
    return Schedule(
        tuple(
            dataclasses.replace(p, lr=(p.lr[0] * factor, p.lr[1] * factor)) for p in schedule.phases
        )
    )


def _sizes(values: list[int]) -> str:
    return ", ".join(map(str, sorted(set(values))))


def _splits(schedule: Schedule) -> str:
    """'batch_size 128 x accum_steps 8' (or one such per phase when they differ)."""
    splits = [f"batch_size {p.batch_size} x accum_steps {p.accum_steps}" for p in schedule.phases]
    if len(set(splits)) == 1:
        return splits[0]
    return "; ".join(f"phase {i}: {split}" for i, split in enumerate(splits))


def plan_world(
    schedule: Schedule, tuned_num_gpus: int | None, world_size: int, mode: str | None
) -> WorldPlan:
    """What `world_size` ranks train of a schedule tuned for `tuned_num_gpus` (None: unknown)
    under --global-batch `mode` (keep, scale, or None: unchanged, with a note)."""
    tuned = tuned_num_gpus
    if tuned is None:
        if mode is not None:
            raise ScheduleError(
                f"--global-batch {mode}: the recipe has no tuned_num_gpus (the GPU count its "
                "batch_size and LRs were tuned for), so there is nothing to keep or scale; "
                "add it to the recipe or leave --global-batch out"
            )
        return WorldPlan(schedule)
    tuned_sizes = [global_batch(p, tuned) for p in schedule.phases]
    if tuned == world_size:
        return WorldPlan(
            schedule,
            (f"global batch {_sizes(tuned_sizes)} on {gpus(tuned)}, as its LRs were tuned",),
        )
    if mode == "keep":
        what = f"--global-batch keep on {gpus(world_size)}"
        kept = keep_global_batch(schedule, tuned, world_size, what)
        line = (
            f"global batch {_sizes(tuned_sizes)} kept on {gpus(world_size)}: {_splits(kept)} "
            f"(tuned for {gpus(tuned)}: {_splits(schedule)}); LRs unchanged"
        )
        return WorldPlan(kept, (line,))
    sizes = _sizes([global_batch(p, world_size) for p in schedule.phases])
    if mode == "scale":
        return WorldPlan(
            scale_lrs(schedule, world_size / tuned),
            (
                f"per-GPU batch kept on {gpus(world_size)}: global batch {sizes} instead of "
                f"{_sizes(tuned_sizes)}, every LR x {world_size}/{tuned} "
                f"(= {world_size / tuned:g}, linear scaling)",
            ),
        )
    return WorldPlan(
        schedule,
        (
            f"note: this schedule's LRs were tuned for {gpus(tuned)} (global batch "
            f"{_sizes(tuned_sizes)}); this run has {ranks(world_size)}, so its global batch is "
            f"{sizes} at the same LRs (batch_size is per GPU); --global-batch keep or scale "
            "adapts it",
        ),
    )


def resume_on(schedule: Schedule, saved_world: int, world_size: int) -> WorldPlan:
    """A checkpoint's schedule (planned for `saved_world` ranks) continued on `world_size`:
    its global batch kept, so every optimizer step covers the same samples."""
    if saved_world == world_size:
        return WorldPlan(schedule)
    what = f"resuming a {saved_world}-rank run on {ranks(world_size)}"
    kept = keep_global_batch(schedule, saved_world, world_size, what)
    sizes = _sizes([global_batch(p, saved_world) for p in schedule.phases])
    return WorldPlan(kept, (f"{what}: {_splits(kept)} keeps the global batch {sizes}",))

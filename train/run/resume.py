"""Can this run resume that one: which checkpoint (resume_path), what changed since it
(check_resume), and whether every rank resumes from the same place."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from train.engine.dist import DistEnv, all_reduce_max
from train.engine.loop import TrainState
from train.errors import CheckpointError, ScheduleError, TrainError
from train.plan.schedule import Schedule
from train.plan.world_size import WorldPlan, resume_on
from train.run.checkpoint import CHECKPOINTS_DIR, LAST_NAME, checkpoint_dir
from train.run.run_dir import run_outputs


def resume_path(out_dir: Path, resume: str | None, overwrite: bool = False) -> Path | None:
    """What to resume from: None (a fresh start) or a checkpoint; refuses what would mix runs."""
    out_dir = Path(out_dir)
    last = checkpoint_dir(out_dir) / LAST_NAME
    outputs = run_outputs(out_dir)
    if resume is None:
        if outputs and not overwrite:
            hint = "--resume auto to continue it, " if last.is_file() else ""
            raise CheckpointError(
                f"{out_dir} already holds a run ({', '.join(outputs)}); pass "
                f"{hint}--overwrite to start over, or choose another --out"
            )
        return None
    if resume == "auto":
        if last.is_file():
            return last
        trained = [name for name in outputs if name in ("metrics.jsonl", f"{CHECKPOINTS_DIR}/")]
        if trained:
            left = sorted(p.name for p in checkpoint_dir(out_dir).glob("*")) or ["nothing"]
            raise CheckpointError(
                f"{out_dir}: no {last} to resume, but the run there got as "
                f"far as {' and '.join(trained)} ({CHECKPOINTS_DIR}/ holds "
                f"{', '.join(left)}); pass --overwrite to start over, or "
                "choose another --out"
            )
        return None
    path = Path(resume)
    if path.is_dir():
        path = checkpoint_dir(path) / LAST_NAME
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint")
    inside = path.resolve().is_relative_to(out_dir.resolve())
    if overwrite and inside:
        raise CheckpointError(
            f"--resume {resume} is inside {out_dir}, which --overwrite "
            "would clear; pass one of them"
        )
    if outputs and not inside and not overwrite:
        raise CheckpointError(
            f"{out_dir} already holds another run ({', '.join(outputs)}); "
            f"continue {path} into an empty --out, or pass --overwrite"
        )
    return path


# Besides the recipe and schedule, identity that changes what the run computes (a resume
# refuses a change unless allowed); sync_bn is absent from checkpoints older than it.
RESULT_SCALARS = ("seed", "precision", "sync_bn")


# Recipe keys a resume need not match: they change no number the run computes from here on
# (init is read only at the start; a resume continues from the checkpoint's weights).
REPORTING_ONLY = ("targets", "eval_every", "eval_offset", "init")


def changes_since(saved: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """What differs in RESULT_KEYS between a checkpoint and this run, one short item each
    (`weight_decay 5e-05 -> 0.001`, `schedule (phase 1: lr [0.1, 0.0] -> [0.2, 0.0])`).
    Keys an older checkpoint did not record are not compared."""
    changes = []
    old_recipe, new_recipe = saved.get("recipe") or {}, identity["recipe"]
    for key in sorted(set(old_recipe) | set(new_recipe)):
        if key not in REPORTING_ONLY and old_recipe.get(key) != new_recipe.get(key):
            changes.append(f"{key} {old_recipe.get(key)!r} -> {new_recipe.get(key)!r}")
    old_phases, new_phases = saved.get("schedule"), identity["schedule"]
    if old_phases != new_phases:
        changes.append(f"schedule ({_schedule_change(old_phases, new_phases)})")
    for key in RESULT_SCALARS:
        if key in saved and saved[key] != identity[key]:
            changes.append(f"{key} {saved[key]!r} -> {identity[key]!r}")
    return changes


def _schedule_change(old: list[dict], new: list[dict]) -> str:
    if len(old) != len(new):
        return f"{len(old)} phases -> {len(new)}"
    for index, (a, b) in enumerate(zip(old, new)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"phase {index}: {key} {a.get(key)!r} -> {b.get(key)!r}"
    return "changed"


def check_resume(
    saved: dict[str, Any], path: Path, identity: dict[str, Any], allow_changed: bool = False
) -> list[str]:
    """Refuse a checkpoint this run cannot continue, with one line naming the difference."""
    if (saved["arch"], saved["num_classes"]) != (identity["arch"], identity["num_classes"]):
        raise TrainError(
            f"{path}: holds {saved['arch']} with {saved['num_classes']} classes, "
            f"this run builds {identity['arch']} with {identity['num_classes']}"
        )
    changes = changes_since(saved, identity)
    if changes and not allow_changed:
        raise TrainError(
            f"{path}: changed since this checkpoint: {'; '.join(changes)}; resume "
            "with the settings the run started with, or pass --allow-changed to "
            "continue with these (recorded in config.json)"
        )
    num_epochs = max(phase["epochs"][1] for phase in identity["schedule"])
    if saved["epoch"] > num_epochs or (saved["epoch"] == num_epochs and saved["step"] > 0):
        raise TrainError(
            f"{path}: epoch {saved['epoch']} step {saved['step']} lies beyond this "
            f"schedule's {num_epochs} epochs; nothing to resume"
        )
    return changes  # saved["epoch"] == num_epochs: the run reports itself complete


def check_resume_on(
    saved: dict[str, Any],
    path: Path,
    identity: dict[str, Any],
    planned_at: Callable[[int], Schedule],
    allow_changed: bool = False,
) -> tuple[dict[str, Any], list[str], WorldPlan | None]:
    """check_resume on any world size: a checkpoint's "world_size" is the one its schedule was
    planned for, so this run's inputs are planned for that one too (`planned_at`) and compared;
    on another world size the run then trains that schedule with its global batch kept.
    Returns (the identity to compare and keep saving, allowed changes, the WorldPlan on this
    world size or None when it is the checkpoint's)."""
    saved_world, world_size = saved["world_size"], identity["world_size"]
    if saved_world == world_size:
        return identity, check_resume(saved, path, identity, allow_changed), None
    try:
        planned = planned_at(saved_world)
    except ScheduleError as exc:
        raise TrainError(f"{path}: planned for {saved_world} rank(s): {exc}") from None
    identity = {**identity, "schedule": planned.to_dicts(), "world_size": saved_world}
    changes = check_resume(saved, path, identity, allow_changed)
    try:
        moved = resume_on(planned, saved_world, world_size)
    except ScheduleError as exc:
        raise TrainError(f"{path}: {exc}") from None
    return identity, changes, moved


def check_step_in_epoch(path: Path | None, state: TrainState, steps: int) -> None:
    """A resumed step past its epoch's end would train nothing, then save final.pt."""
    if state.step > steps:
        raise TrainError(
            f"{path}: step {state.step} lies beyond epoch {state.epoch}'s {steps} steps (a "
            "checkpoint of other data or batch sizes?); resume from an epoch-end checkpoint"
        )


def check_ranks_agree(env: DistEnv, resuming: bool, state: TrainState) -> None:
    """Every rank resumes from the same position, or none does (one min and one max)."""
    if not env.distributed:
        return
    position = [float(resuming), float(state.epoch), float(state.step)]
    high = all_reduce_max(env, torch.tensor(position, device=env.device))
    low = -all_reduce_max(env, -torch.tensor(position, device=env.device))
    if not torch.equal(high, low):
        mine = f"epoch {state.epoch} step {state.step}" if resuming else "a fresh start"
        raise TrainError(
            f"ranks disagree on the resume point (rank {env.rank} sees {mine}); "
            "put --out on storage that every node shares"
        )

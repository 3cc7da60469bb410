"""Atomic checkpoints and exact resume: capture, resume checks, restore."""

from __future__ import annotations

import dataclasses
import pickle
import random
from pathlib import Path
from typing import Any

import torch

from formats.files import write_atomic
from train.engine.loop import TrainState, sums_from_dict
from train.engine.step import ModelStep
from train.errors import CheckpointError, TrainError
from train.run.run_dir import run_outputs

CHECKPOINT_VERSION = 2  # 2: phases gained lr_shape, accum_steps, crop_multiple
CHECKPOINTS_DIR = "checkpoints"
LAST_NAME = "last.pt"
FINAL_NAME = "final.pt"


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


# What every checkpoint of this version holds (capture()); sync_bn came later, so is optional.
SAVED_KEYS = (
    "arch",
    "num_classes",
    "recipe",
    "schedule",
    "seed",
    "world_size",
    "precision",
    "epoch",
    "step",
    "global_step",
    "elapsed_s",
    "eval_s",
    "partial",
    "model",
    "optimizer",
    "scaler",
    "ema",
    "rng",
)


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """torch.save to `<path>.tmp`, fsync, rename over `path`, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda f: torch.save(state, f))


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; tensors only (weights_only), no arbitrary pickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text advises weights_only=False: not here
        raise CheckpointError(
            f"{path}: not a checkpoint of tensors and plain data, not loaded "
            f"({_unpickler_reason(exc)})"
        ) from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: not a shardtrain checkpoint of version {CHECKPOINT_VERSION}"
        )
    missing = [key for key in SAVED_KEYS if key not in state]
    positions = [state.get(key) for key in ("epoch", "step", "global_step")]
    if (
        missing
        or not all(isinstance(v, int) and v >= 0 for v in positions)
        or not (isinstance(state["recipe"], dict) and isinstance(state["schedule"], list))
    ):
        what = f"missing {', '.join(missing)}" if missing else "fields of the wrong type"
        raise CheckpointError(f"{path}: a damaged shardtrain checkpoint ({what})")
    return state


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what it met ("Unsupported operand
    103", "Trying to load unsupported GLOBAL posix.system ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = [line for line in lines[1:] if not line.startswith(("Please file", "Check the"))]
    return (detail[0] if detail else lines[0] if lines else "UnpicklingError")[:200]


def resume_path(out_dir: Path, resume: str | None, overwrite: bool = False) -> Path | None:
    """What to resume from: None (a fresh start) or a checkpoint; refuses what would mix runs.

    A fresh start into a directory that holds a run's outputs is refused unless `overwrite`
    (the caller then clears them), so a rerun never silently overwrites config.json or appends
    a second epoch 0 to metrics.jsonl. `--resume auto` without checkpoints/last.pt starts fresh
    only when nothing was trained there (no epoch records, no checkpoint files: a run stopped
    before its first save); a deleted checkpoint, or only an interrupted `last.pt.tmp`, is
    refused. `--resume PATH` (a checkpoint or run directory) continues that checkpoint, into
    `out_dir` when that holds no other run.
    """
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


def find_for_export(run_dir: Path) -> Path:
    """final.pt when the run finished, else last.pt; a .pt path is taken as it is."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    for name in (FINAL_NAME, LAST_NAME):
        path = checkpoint_dir(run_dir) / name
        if path.is_file():
            return path
    raise CheckpointError(f"{run_dir}: no checkpoints/{FINAL_NAME} or checkpoints/{LAST_NAME}")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def _as_python_state(value: Any) -> tuple:
    """random.getstate() is (version, tuple of ints, gauss); pickling may turn tuples to lists."""
    version, internal, gauss = value
    return version, tuple(internal), gauss


# --- capture / check / restore ------------------------------------------------------------

IDENTITY_KEYS = (
    "arch",
    "num_classes",
    "recipe",
    "schedule",
    "seed",
    "world_size",
    "precision",
    "sync_bn",
)
# Besides the recipe and schedule, identity that changes what the run computes (a resume
# refuses a change unless allowed); sync_bn is absent from checkpoints older than it.
RESULT_SCALARS = ("seed", "precision", "sync_bn")
REPORTING_ONLY = ("targets",)  # recipe keys that change no number the run computes


def capture(
    state: TrainState, trainer: ModelStep, identity: dict[str, Any], elapsed_s: float
) -> dict[str, Any]:
    """Everything a resume needs: `identity` (IDENTITY_KEYS: what run this is), the position,
    the epoch's sums, weights, optimizer, scaler, EMA and RNG states."""
    plain = trainer.module if trainer.module is not None else trainer.model
    return {
        "version": CHECKPOINT_VERSION,
        **{key: identity[key] for key in IDENTITY_KEYS},
        "epoch": state.epoch,
        "step": state.step,
        "global_step": state.global_step,
        "elapsed_s": elapsed_s,
        "eval_s": state.eval_s,
        "partial": dataclasses.asdict(state.sums),
        "model": plain.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "rng": rng_state(),
    }


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
    """Refuse a checkpoint this run cannot continue, with one line naming the difference.

    A change that only alters results (recipe, schedule, seed, precision) is refused too,
    unless `allow_changed`; the changes are returned, for config.json. A model that no longer
    fits the weights (arch, classes) or a mid-epoch world-size change is never allowed."""
    if (saved["arch"], saved["num_classes"]) != (identity["arch"], identity["num_classes"]):
        raise TrainError(
            f"{path}: holds {saved['arch']} with {saved['num_classes']} classes, "
            f"this run builds {identity['arch']} with {identity['num_classes']}"
        )
    if saved["step"] > 0 and saved["world_size"] != identity["world_size"]:
        raise TrainError(
            f"{path}: stopped mid-epoch with world size {saved['world_size']}; "
            f"resume it with the same number of processes (not "
            f"{identity['world_size']}) or from an epoch-end checkpoint"
        )
    num_epochs = max(phase["epochs"][1] for phase in identity["schedule"])
    if saved["epoch"] >= num_epochs:
        return []  # nothing left to train: the run reports itself complete
    changes = changes_since(saved, identity)
    if changes and not allow_changed:
        raise TrainError(
            f"{path}: changed since this checkpoint: {'; '.join(changes)}; resume "
            "with the settings the run started with, or pass --allow-changed to "
            "continue with these (recorded in config.json)"
        )
    return changes


def restore(saved: dict[str, Any], state: TrainState, trainer: ModelStep) -> None:
    """Load weights, optimizer, scaler, EMA, RNG and position into a freshly built run."""
    plain = trainer.module if trainer.module is not None else trainer.model
    try:
        plain.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        if trainer.scaler is not None and saved["scaler"] is not None:
            trainer.scaler.load_state_dict(saved["scaler"])
        if trainer.ema is not None and saved["ema"] is not None:
            trainer.ema.load_state_dict(saved["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # "size mismatch", ...
        raise TrainError(
            f"the checkpoint's weights do not fit this run's model ({_first_lines(exc)})"
        ) from None
    try:
        restore_rng_state(saved["rng"])
        sums = sums_from_dict(saved["partial"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"damaged RNG or epoch-sum state ({_first_lines(exc)})") from None
    state.epoch, state.step, state.global_step = saved["epoch"], saved["step"], saved["global_step"]
    state.elapsed_s, state.eval_s = saved["elapsed_s"], saved["eval_s"]
    state.sums = sums


def _first_lines(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines()[:2]]
    return f"{type(exc).__name__}: {' '.join(lines)[:300]}"

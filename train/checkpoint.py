"""Atomic checkpoints and exact resume: capture, resume checks, restore.

A checkpoint is written to a temp file in the same directory, fsynced, then renamed over the
old one, so a crash (even SIGKILL) at any moment leaves either the previous checkpoint or the
new one, never half of one. `last.pt` is replaced at every save (each epoch, every
`--checkpoint-every-steps`, on SIGINT/SIGTERM); `final.pt` is written once at the end.

Resume is exact because everything a step depends on is either in the checkpoint (weights,
optimizer momentum, grad scaler, EMA, BN statistics, the (epoch, step) position and the
partial-epoch metric sums) or a pure function of it: the schedule gives the LR of (epoch, step),
the loaders give batch b of epoch e from (seed, epoch, rank, world_size, b), and the per-step
mixup/cutmix draws are seeded from (seed, epoch, step, rank). Global RNG states are saved too,
for anything else that might draw from them.

`capture(state, trainer, identity)` is what a save writes; `check_resume(saved, ...)` refuses a
checkpoint the run cannot continue (another schedule, model or mid-epoch world size) before
anything is restored: the home of every "can this run resume that one" rule.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

from formats.files import write_atomic
from train.config import TrainError
from train.loop import TrainState, sums_from_dict
from train.step import Trainer

CHECKPOINT_VERSION = 2  # 2: phases gained lr_shape, accum_steps, crop_multiple
CHECKPOINTS_DIR = "checkpoints"
LAST_NAME = "last.pt"
FINAL_NAME = "final.pt"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


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
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: not a shardtrain checkpoint of version "
                              f"{CHECKPOINT_VERSION}")
    return state


def resume_path(out_dir: Path, resume: str | None) -> Path | None:
    """What to resume from: None (fresh), 'auto' (last.pt when it exists), or a path.

    A fresh start into a directory that already holds a checkpoint is refused, so a rerun
    without --resume never silently overwrites a run.
    """
    last = checkpoint_dir(out_dir) / LAST_NAME
    if resume is None:
        if last.exists():
            raise CheckpointError(f"{out_dir} already holds a run ({last}); pass --resume auto "
                                  "to continue it or choose another --out")
        return None
    if resume == "auto":
        return last if last.exists() else None
    path = Path(resume)
    if path.is_dir():
        path = checkpoint_dir(path) / LAST_NAME
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint")
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

IDENTITY_KEYS = ("arch", "num_classes", "recipe", "schedule", "seed", "world_size", "precision")


def capture(state: TrainState, trainer: Trainer, identity: dict[str, Any],
            elapsed_s: float) -> dict[str, Any]:
    """Everything a resume needs: `identity` (IDENTITY_KEYS: what run this is), the position,
    the epoch's sums, weights, optimizer, scaler, EMA and RNG states."""
    plain = trainer.module if trainer.module is not None else trainer.model
    return {
        "version": CHECKPOINT_VERSION, **{key: identity[key] for key in IDENTITY_KEYS},
        "epoch": state.epoch, "step": state.step, "global_step": state.global_step,
        "elapsed_s": elapsed_s, "eval_s": state.eval_s,
        "partial": dataclasses.asdict(state.sums),
        "model": plain.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "rng": rng_state(),
    }


def check_resume(saved: dict[str, Any], path: Path, identity: dict[str, Any],
                 phases_path: Path) -> None:
    """Refuse a checkpoint this run cannot continue, with one line naming the difference."""
    if saved["schedule"] != identity["schedule"]:
        raise TrainError(f"{path}: the schedule differs from {phases_path}; resume with the "
                         "phases file the run started with")
    if (saved["arch"], saved["num_classes"]) != (identity["arch"], identity["num_classes"]):
        raise TrainError(f"{path}: holds {saved['arch']} with {saved['num_classes']} classes, "
                         f"this run builds {identity['arch']} with {identity['num_classes']}")
    if saved["step"] > 0 and saved["world_size"] != identity["world_size"]:
        raise TrainError(f"{path}: stopped mid-epoch with world size {saved['world_size']}; "
                         f"resume it with the same number of processes (not "
                         f"{identity['world_size']}) or from an epoch-end checkpoint")


def restore(saved: dict[str, Any], state: TrainState, trainer: Trainer) -> None:
    """Load weights, optimizer, scaler, EMA, RNG and position into a freshly built run."""
    plain = trainer.module if trainer.module is not None else trainer.model
    plain.load_state_dict(saved["model"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    if trainer.scaler is not None and saved["scaler"] is not None:
        trainer.scaler.load_state_dict(saved["scaler"])
    if trainer.ema is not None and saved["ema"] is not None:
        trainer.ema.load_state_dict(saved["ema"])
    restore_rng_state(saved["rng"])
    state.epoch, state.step, state.global_step = saved["epoch"], saved["step"], \
        saved["global_step"]
    state.elapsed_s, state.eval_s = saved["elapsed_s"], saved["eval_s"]
    state.sums = sums_from_dict(saved["partial"])

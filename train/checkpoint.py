"""Atomic checkpoints and exact resume.

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
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from formats.files import write_atomic

CHECKPOINT_VERSION = 1
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

"""Atomic checkpoints and exact resume: capture, resume checks, restore."""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from formats import fsync_dir, write_atomic
from train.engine.loop import TrainState, sums_from_dict
from train.engine.step import ModelStep
from train.errors import CheckpointError, TrainError, one_line

CHECKPOINT_VERSION = 2  # 2: phases gained lr_shape, accum_steps, crop_multiple
CHECKPOINTS_DIR = "checkpoints"
LAST_NAME = "last.pt"
FINAL_NAME = "final.pt"
BEST_NAME = "best.pt"  # the evaluation with the highest top-1 of the model (not the EMA)
CHECKPOINT_CHOICES = {"final": FINAL_NAME, "last": LAST_NAME, "best": BEST_NAME}


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


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
# What every checkpoint of this version holds (capture()); sync_bn came later, so is optional.
SAVED_KEYS = tuple(key for key in IDENTITY_KEYS if key != "sync_bn") + (
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
    """torch.save to `<path>.tmp`, fsync, rename over `path`, fsync the directory. Serialized
    in memory first: torch's zip writer reports a short write on a full disk as "enforce fail
    ... unexpected pos", while a plain write raises the OS's own error (ENOSPC)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def link_atomic(source: Path, target: Path) -> Path:
    """`target` holds `source`'s bytes without a second write of a checkpoint (ResNet-50 with its
    optimizer state: ~200 MB, fsynced): a hard link, replaced by rename. Saves rename a new file
    over `source`, so the link keeps these bytes. A file system without hard links gets a copy."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                raise
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return target


def write_reason(exc: BaseException) -> str:
    """An OSError's own words (`No space left on device`), else the exception on one line."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc, 200)


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
        raise CheckpointError(f"{path}: unreadable checkpoint ({one_line(exc)})") from None
    return check_loaded(state, path)


def check_loaded(state: Any, path: Path) -> dict[str, Any]:
    """`state`, read from `path`, if it is a whole checkpoint of this version (load's checks,
    for a caller that has read the file already); else one CheckpointError."""
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


def find_for_export(run_dir: Path, which: str | None = None) -> Path:
    """A run's checkpoints/<which>.pt (best, final or last); without `which`, final.pt when the
    run finished, else last.pt. A .pt path is taken as it is."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if which is not None and which not in CHECKPOINT_CHOICES:
        raise CheckpointError(
            f"--checkpoint {which!r}: expected one of {', '.join(CHECKPOINT_CHOICES)}"
        )
    names = [CHECKPOINT_CHOICES[which]] if which else [FINAL_NAME, LAST_NAME]
    for name in names:
        path = checkpoint_dir(run_dir) / name
        if path.is_file():
            return path
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory or checkpoint file")
    raise CheckpointError(f"{run_dir}: no {' or '.join(f'{CHECKPOINTS_DIR}/{n}' for n in names)}")


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
            f"the checkpoint's weights do not fit this run's model ({one_line(exc)})"
        ) from None
    try:
        restore_rng_state(saved["rng"])
        sums = sums_from_dict(saved["partial"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"damaged RNG or epoch-sum state ({one_line(exc)})") from None
    state.epoch, state.step, state.global_step = saved["epoch"], saved["step"], saved["global_step"]
    state.elapsed_s, state.eval_s = saved["elapsed_s"], saved["eval_s"]
    state.sums = sums


def last_kept(out_dir: Path) -> str:
    """What a failed run leaves to resume from, for its one-line error."""
    last = checkpoint_dir(out_dir) / LAST_NAME
    return (
        f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    )


def save_run(saved: dict[str, Any], out_dir: Path, final: bool, best: bool = False) -> None:
    """last.pt (and final.pt at the end, best.pt at a new best top-1); a failed write (full
    disk, read-only --out) is one line, the previous last.pt kept whole (save_atomic replaces
    it only when complete)."""
    directory = checkpoint_dir(out_dir)
    try:
        last = save_atomic(saved, directory / LAST_NAME)
        for name, wanted in ((FINAL_NAME, final), (BEST_NAME, best)):
            if wanted:
                link_atomic(last, directory / name)
    except (OSError, RuntimeError) as exc:  # torch's zip writer wraps some OSErrors
        raise TrainError(
            f"cannot save a checkpoint in {directory} ({write_reason(exc)}); {last_kept(out_dir)}"
        ) from None

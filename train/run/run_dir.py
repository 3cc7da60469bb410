"""The run directory: one `train run` at a time (flock), and which outputs --overwrite clears."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from train.engine.dist import DistEnv, rank_zero_agreed
from train.errors import TrainError

LOCK_NAME = ".lock"
_held_fds: set[int] = set()  # this process's run-dir locks, closed in forked children
_fork_hook: list[bool] = []  # registered once, on the first lock (nothing at import time)
# What `train run` (and `train report`'s default plot) write into a run directory.
OUTPUT_FILES = ("config.json", "metrics.jsonl", "event.log", "curves.png")
OUTPUT_DIRS = ("checkpoints", "tb")
RESUME_CONFIGS = "config.resume-*.json"


def run_outputs(out_dir: Path) -> list[str]:
    """Names of the run outputs present in `out_dir` (an empty checkpoints/ or tb/ is none)."""
    out_dir = Path(out_dir)
    found = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    found += [
        f"{name}/"
        for name in OUTPUT_DIRS
        if (out_dir / name).is_dir() and any((out_dir / name).iterdir())
    ]
    found += sorted(path.name for path in out_dir.glob(RESUME_CONFIGS))
    return found


def clear_outputs(out_dir: Path) -> list[str]:
    """Remove the run outputs (`--overwrite`) and say which; other files stay."""
    out_dir = Path(out_dir)
    found = run_outputs(out_dir)
    try:
        for name in OUTPUT_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for path in out_dir.glob(RESUME_CONFIGS):
            path.unlink()
        for name in OUTPUT_DIRS:
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
    except OSError as exc:
        raise TrainError(f"{out_dir}: cannot clear the old run ({exc.strerror or exc})") from None
    return found


def acquire(out_dir: Path) -> int:
    """The locked descriptor of `<out>/.lock` (directory and file created as needed), or a
    TrainError naming the live holder, or what made the directory unwritable."""
    out_dir = Path(out_dir)
    lock = out_dir / LOCK_NAME
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise TrainError(
            f"{out_dir}: cannot write the run directory "
            f"({exc.strerror or exc}: {exc.filename or lock})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _held_fds.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        _held_fds.discard(fd)
        held = exc.errno in (errno.EAGAIN, errno.EACCES)
        text = _holder_pid(fd) if held else ""
        os.close(fd)
        if not held:  # a full disk, say: nothing else could be written there either
            raise TrainError(
                f"{out_dir}: cannot write the run directory ({exc.strerror}: {lock})"
            ) from None
        holder = f"PID {text}" if text.isdigit() else "another process"
        raise TrainError(
            f"{out_dir} is in use by {holder}, a train run writing there (lock "
            f"{lock}); wait for it to finish or stop it, or choose another "
            "--out"
        ) from None
    if not _fork_hook:
        os.register_at_fork(after_in_child=close_inherited_locks)
        _fork_hook.append(True)
    return fd


def _holder_pid(fd: int) -> str:
    # The holder writes its PID just after locking: a refusal in between waits briefly for it
    # (as prep/lock.py's refusal does; prep and train share no code).
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return text


def release(fd: int) -> None:
    _held_fds.discard(fd)
    os.close(fd)


def close_inherited_locks() -> None:
    """In a forked child: drop the parent's lock descriptors (the lock stays the parent's)."""
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


@contextlib.contextmanager
def hold_run_dir(out_dir: Path, env: DistEnv) -> Iterator[None]:
    """Rank 0 holds `<out>/.lock` for the block; a refusal is raised on every rank."""
    fd = rank_zero_agreed(env, lambda: acquire(out_dir))
    try:
        yield
    finally:
        if fd is not None:
            release(fd)

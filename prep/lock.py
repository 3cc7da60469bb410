"""One writer per dataset output: an exclusive lock that the kernel releases when its process
dies, however it dies (flock on `<out>/.<split>-<prep_size>.lock`, holding the holder's PID).

A second build of the same output refuses at once, naming the holder, instead of both writing
the same files. The lock file is removed on release; a process that opened it just before
(and so may lock the removed file) sees that the path no longer names its file and retries.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from prep.partial import BuildError

_held_fds: set[int] = set()  # this process's lock descriptors (forked workers close theirs)


class LockedError(BuildError):
    """Another live process holds the lock: one line for the user."""


def lock_path(out_dir: Path, dataset_name: str) -> Path:
    return Path(out_dir) / f".{dataset_name}.lock"


def _holder(fd: int) -> str:
    # The holder writes its PID just after locking: a refusal in between waits briefly for it.
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"PID {text}"
        time.sleep(0.01)
    return "another process"


def acquire(path: Path, what: str) -> int:
    """The locked descriptor of `path` (created if needed), or LockedError naming the holder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd) if err.errno in (errno.EAGAIN, errno.EACCES) else None
            os.close(fd)
            if holder is None:
                raise
            raise LockedError(f"{what} is being built by {holder} (lock {path}); wait for it "
                              "to finish or stop it, then rerun") from None
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # we locked a file its last holder had just removed: try the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_fds.add(fd)
    return fd


def release(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # while still holding it, so nobody locks a file about to vanish
    _held_fds.discard(fd)
    os.close(fd)


@contextlib.contextmanager
def locked(paths_and_names: list[tuple[Path, str]]) -> Iterator[None]:
    """Hold every lock for the block; all or none (a refusal releases what was taken)."""
    taken: list[tuple[Path, int]] = []
    try:
        for path, what in paths_and_names:
            taken.append((path, acquire(path, what)))
        yield
    finally:
        for path, fd in reversed(taken):
            release(path, fd)


def close_inherited_locks() -> None:
    """In a forked child: drop the parent's lock descriptors, so only the parent holds them."""
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()

"""Storage formats shared by prep (writers) and train (readers). Imports none of our packages.

Here: the dependency-free pieces every user of a dataset directory shares (numpy-free code such
as train's schedule maths imports them too): its error, its directory names, crash-safe writes.
The schema, manifest and stores live in the modules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


class DatasetError(Exception):
    """A dataset directory is missing, incomplete, corrupt or of an unknown version."""


def split_dir_name(split: str, prep_size: int) -> str:
    """`train-160`, `val-320`: the directory of one split at one prep_size."""
    return f"{split}-{prep_size}"


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """`write(f)` fills a temp file beside `path`; it is synced and renamed over `path`, and the
    rename synced. On failure the temp file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path

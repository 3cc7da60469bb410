"""Class and image folders, walked once: every entry becomes a file to read or a listed reject.

Nothing under a class folder is dropped silently: files in subfolders are images of that class
(named by their path inside it), and hidden entries, broken or looping symlinks, unreadable
folders and non-files (fifos would block a reader forever) are listed with their reason.
Symlinked folders are followed once each, so a loop or a second path to one folder adds nothing.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

HIDDEN = "hidden file or folder: skipped"
NOT_IN_A_CLASS = "not inside a class folder"


@dataclasses.dataclass(frozen=True)
class FolderEntry:
    name: str  # path relative to the walked folder, '/'-separated
    path: str
    nbytes: int
    reject: str = ""  # why this entry cannot be an image ("" for a file to read)


def _stat(path: str) -> os.stat_result | str:
    """The entry's stat, following symlinks, or why it has none (ELOOP, a dangling link, ...)."""
    try:
        return os.stat(path)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"


def _walk(directory: str, prefix: str, seen: set, out: list[FolderEntry]) -> None:
    try:
        with os.scandir(directory) as scan:
            children = sorted(scan, key=lambda entry: entry.name)
    except OSError as err:
        out.append(
            FolderEntry(
                prefix.rstrip("/"), directory, 0, f"unreadable folder: {err.strerror or err}"
            )
        )
        return
    for entry in children:
        name = prefix + entry.name
        if entry.name.startswith("."):
            out.append(FolderEntry(name, entry.path, 0, HIDDEN))
            continue
        info = _stat(entry.path)
        if isinstance(info, str):
            out.append(FolderEntry(name, entry.path, 0, info))
        elif stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in seen:
                out.append(
                    FolderEntry(
                        name,
                        entry.path,
                        0,
                        "symlink to a folder already included (a loop, or another class's "
                        "folder): not followed",
                    )
                )
                continue
            seen.add((info.st_dev, info.st_ino))
            _walk(entry.path, name + "/", seen, out)
        elif stat.S_ISREG(info.st_mode):
            out.append(FolderEntry(name, entry.path, info.st_size))
        else:
            out.append(
                FolderEntry(name, entry.path, 0, "not a regular file (a device, fifo or socket)")
            )


def _identity(path: Path) -> tuple[int, int] | None:
    info = _stat(str(path))
    return None if isinstance(info, str) else (info.st_dev, info.st_ino)


def walk_images(directory: Path) -> list[FolderEntry]:
    """Every entry under `directory`, subfolders included, in sorted order."""
    return walk_class_folders(directory, [""])[""]


def walk_class_folders(split_dir: Path, classes: list[str]) -> dict[str, list[FolderEntry]]:
    """Each class folder's entries. A symlink to the split folder or to any class folder is
    listed, not followed: its images would count twice, under the wrong label."""
    seen = {_identity(split_dir / name) for name in ["", *classes]} - {None}
    walked = {}
    for name in classes:
        walked[name] = []
        _walk(str(split_dir / name), "", seen, walked[name])
    return walked


def class_folders(split_dir: Path) -> tuple[list[str], list[FolderEntry]]:
    """(names of the class folders in `split_dir`, its other entries as rejects)."""
    classes, others = [], []
    with os.scandir(split_dir) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if entry.name.startswith("."):
            others.append(FolderEntry(entry.name, entry.path, 0, HIDDEN))
            continue
        info = _stat(entry.path)
        if isinstance(info, str):
            others.append(FolderEntry(entry.name, entry.path, 0, info))
        elif stat.S_ISDIR(info.st_mode):
            classes.append(entry.name)
        else:
            others.append(FolderEntry(entry.name, entry.path, 0, NOT_IN_A_CLASS))
    return classes, others

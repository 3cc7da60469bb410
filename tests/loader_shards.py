"""Helpers for the loader tests over conftest's session `built_shards` (3 classes x 6 train,
x 4 val, prep_size 160, both stores: sizes from 48x66 to 213x160, the sample's odd shapes).
Tests that damage a dataset copy it first."""

from __future__ import annotations

import shutil
from pathlib import Path

STORES = ("lmdb", "msgpack")


def dataset_dir(built_shards: Path, store: str = "lmdb", split: str = "train") -> Path:
    return built_shards / store / f"{split}-160"


def damaged_copy(source_dir: Path, target_dir: Path) -> Path:
    shutil.copytree(source_dir, target_dir)
    return target_dir


def corrupt_record(dataset_dir: Path, value: bytes) -> None:
    """Zero the JPEG header of the stored `value` in place, wherever the store keeps it."""
    for path in sorted(dataset_dir.glob("*.mdb")) + sorted(dataset_dir.glob("shard-*.msgpack")):
        raw = bytearray(path.read_bytes())
        start = raw.find(value)
        if start >= 0:
            raw[start : start + 64] = bytes(64)
            path.write_bytes(bytes(raw))
            return
    raise AssertionError("record bytes not found in the store files")

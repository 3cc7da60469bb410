"""Open a finished dataset directory's store by what its manifest says it is."""

from __future__ import annotations

from pathlib import Path

from formats.lmdb_store import LmdbReader
from formats.manifest import Manifest
from formats.msgpack_store import MsgpackReader


def open_reader(dataset_dir: Path, manifest: Manifest):
    """A zero-copy reader (`len`, `view(i) -> memoryview`), opened lazily per process."""
    if manifest.store == "lmdb":
        return LmdbReader(dataset_dir, manifest.count)
    return MsgpackReader(dataset_dir, manifest.count)

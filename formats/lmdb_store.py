"""LMDB store: one environment per dataset directory, key = zero-padded record index,
value = the JPEG bytes.

Writer: keys arrive in order, so puts use append mode (no B-tree searches, pages filled
sequentially). Reader: read-only, lock-free, opened lazily in the process (and thread) that
reads, because an LMDB environment must not cross a fork; values come back as memoryviews
into the map, valid while the reader's transaction lives (we keep one per thread for the life
of the reader, which is safe since nothing writes a finished dataset).
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import lmdb

from formats.errors import DatasetError
from formats.record import encode_key

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
# Address space only: LMDB files grow as pages are written, not to map_size.
WRITER_MAP_BYTES = 1 << 40


class LmdbWriter:
    """Appends records in index order; `commit` makes them durable.

    Opening keeps the first `keep_records` records and drops anything after them (a resumed
    build rolls back to its last saved progress). Labels are not stored here: they live in the
    record table beside the store, so values stay pure JPEG.
    """

    def __init__(self, dataset_dir: Path, keep_records: int = 0):
        self.dataset_dir = Path(dataset_dir)
        self._env = lmdb.open(
            str(self.dataset_dir), map_size=WRITER_MAP_BYTES, subdir=True,
            readahead=False, meminit=False, max_dbs=0,
        )
        self._txn: lmdb.Transaction | None = None
        if self.count() < keep_records:
            raise DatasetError(
                f"{self.dataset_dir}: store holds {self.count()} records, progress says {keep_records}"
            )
        self._truncate(keep_records)

    def count(self) -> int:
        return self._env.stat()["entries"]

    def append(self, index: int, label: int, jpeg: bytes) -> None:
        if self._txn is None:
            self._txn = self._env.begin(write=True)
        if not self._txn.put(encode_key(index), jpeg, append=True, overwrite=False):
            raise DatasetError(f"{self.dataset_dir}: record {index} written twice")

    def commit(self) -> None:
        if self._txn is not None:
            self._txn.commit()
            self._txn = None
        self._env.sync(True)

    def _truncate(self, num_records: int) -> None:
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor()
            if cursor.set_range(encode_key(num_records)):
                while cursor.delete():
                    pass
        self._env.sync(True)

    def finish(self) -> dict[str, dict]:
        """Close, leave only the data file (readers open lock-free), and return its digest."""
        self.commit()
        self._env.close()
        lock_path = self.dataset_dir / LOCK_FILE
        if lock_path.exists():
            lock_path.unlink()
        return {DATA_FILE: content_digest(self.dataset_dir)}

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._env.close()


class LmdbReader:
    """Zero-copy random access; safe to create before DataLoader workers fork."""

    def __init__(self, dataset_dir: Path, count: int, readahead: bool = False):
        self.dataset_dir = Path(dataset_dir)
        self.count = count
        self.readahead = readahead  # True for sequential scans (verify), False for random reads
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._local = threading.local()
        self._open_lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        # Pickled into worker processes: ship the path, never an open environment.
        return {"dataset_dir": self.dataset_dir, "count": self.count, "readahead": self.readahead}

    def __setstate__(self, state):
        self.__init__(**state)

    def _txn(self) -> lmdb.Transaction:
        if self._pid != os.getpid():
            with self._open_lock:
                if self._pid != os.getpid():
                    self._env = self._open()
                    self._local = threading.local()
                    self._pid = os.getpid()
        txn = getattr(self._local, "txn", None)
        if txn is None:
            txn = self._local.txn = self._env.begin(buffers=True)
        return txn

    def _open(self) -> lmdb.Environment:
        if not (self.dataset_dir / DATA_FILE).is_file():
            raise DatasetError(f"{self.dataset_dir}: no {DATA_FILE}")
        try:
            env = lmdb.open(
                str(self.dataset_dir), readonly=True, lock=False, subdir=True,
                readahead=self.readahead, meminit=False, max_readers=4096,
            )
        except lmdb.Error as err:
            raise DatasetError(f"{self.dataset_dir}: cannot open LMDB ({err})") from None
        entries = env.stat()["entries"]
        if entries != self.count:
            env.close()
            raise DatasetError(
                f"{self.dataset_dir}: LMDB holds {entries} records, manifest says {self.count}"
            )
        return env

    def view(self, index: int) -> memoryview:
        if not 0 <= index < self.count:
            raise IndexError(f"record {index} out of range [0, {self.count})")
        try:
            value = self._txn().get(encode_key(index))
        except lmdb.Error as err:
            raise DatasetError(f"{self.dataset_dir}: record {index}: LMDB error ({err})") from None
        if value is None:
            raise DatasetError(f"{self.dataset_dir}: record {index} is missing")
        return value

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env, self._pid = None, -1


def content_digest(dataset_dir: Path) -> dict:
    """sha256 over every (key, value) in key order.

    An LMDB file's bytes depend on its transaction history (page reuse after a resumed build
    rolls back, junk in page slack), not only on its contents, so the manifest records this
    instead of a file hash: equal contents give equal digests, and verify recomputes it."""
    h = hashlib.sha256()
    count = 0
    try:
        env = lmdb.open(str(dataset_dir), readonly=True, lock=False, subdir=True, readahead=True)
    except lmdb.Error as err:
        raise DatasetError(f"{dataset_dir}: cannot open LMDB ({err})") from None
    with env, env.begin(buffers=True) as txn:
        for key, value in txn.cursor():
            h.update(key)
            h.update(len(value).to_bytes(8, "little"))
            h.update(value)
            count += 1
    return {"records": count, "content_sha256": h.hexdigest()}

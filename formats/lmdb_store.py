"""LMDB store: one environment per dataset directory, key = zero-padded record index,
value = the JPEG bytes.

Writer: keys arrive in order, so puts use append mode (no B-tree searches, pages filled
sequentially). Reader: read-only, lock-free, opened lazily in the process (and thread) that
reads, because an LMDB environment must not cross a fork; values come back as memoryviews
into the map, valid while the reader's transaction lives (we keep one per thread for the life
of the reader, which is safe since nothing writes a finished dataset).
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from pathlib import Path

import lmdb

from formats import DatasetError
from formats.record import checksum, encode_key

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
# Address space only: LMDB files grow as pages are written, not to map_size.
WRITER_MAP_BYTES = 1 << 40

# LMDB's two meta pages (64-bit layout): a 16-byte page header, then magic and version; the
# page size sits in the free DB's md_pad, then the last page number and the txn id.
_META_MAGIC = 0xBEEFC0DE
_META_HEAD = struct.Struct("=16xII16xI92xQQ")  # magic, version, psize, last_pgno, txnid


# LMDB reports a write cut short by a full disk as EIO ("mdb_txn_commit: Input/output error",
# its own "short write, filesystem full?" case). With less than this free it is that, and is
# said so; one commit writes at most a few MiB at a time.
FULL_DISK_BYTES = 16 << 20


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    # root may use the reserve
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _write_error(dataset_dir: Path, err: lmdb.Error) -> Exception:
    """A failed LMDB write as the error it is: OSError(ENOSPC) naming data.mdb when the disk is
    full (what every other prep write says then), else LMDB's own."""
    text = str(err)
    if "No space left" in text or (
        "Input/output error" in text and (_free_bytes(dataset_dir) or 0) < FULL_DISK_BYTES
    ):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(dataset_dir) / DATA_FILE))
    return err


def check_data_file(dataset_dir: Path) -> None:
    """Refuse a data.mdb shorter than its own newest meta page says it is, before anything maps
    it: touching a mapped page past the end of the file is a SIGBUS, not an error. (The
    manifest cannot hold data.mdb's size: it depends on commit timing, and a resumed build must
    write the same manifest bytes as an uninterrupted one.)"""
    path = Path(dataset_dir) / DATA_FILE
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(_META_HEAD.size)
            psize = _META_HEAD.unpack(first)[2] if len(first) == _META_HEAD.size else 0
            f.seek(psize)
            second = f.read(_META_HEAD.size) if psize else b""
    except FileNotFoundError:
        raise DatasetError(f"{dataset_dir}: no {DATA_FILE} (LMDB store missing)") from None
    except OSError as err:
        raise DatasetError(f"{path}: unreadable ({err.strerror or err})") from None
    metas = [_META_HEAD.unpack(raw) for raw in (first, second) if len(raw) == _META_HEAD.size]
    metas = [meta for meta in metas if meta[0] == _META_MAGIC and meta[2] == psize]
    if len(metas) != 2 or not psize or psize & (psize - 1):
        raise DatasetError(f"{path}: {size:,} bytes, not an LMDB data file (damaged or truncated)")
    last_pgno = max(metas, key=lambda meta: meta[4])[3]
    needed = (last_pgno + 1) * psize
    if size < needed:
        raise DatasetError(
            f"{path}: {size:,} bytes, but its LMDB pages need {needed:,}: the file "
            "is truncated (rebuild the dataset, or restore data.mdb)"
        )


class LmdbWriter:
    """Appends records in index order; `commit` makes them durable.

    Opening keeps the first `keep_records` records and drops anything after them (a resumed
    build rolls back to its last saved progress). Labels are not stored here: they live in the
    record table beside the store, so values stay pure JPEG.
    """

    def __init__(self, dataset_dir: Path, keep_records: int = 0):
        self.dataset_dir = Path(dataset_dir)
        # resuming: LMDB would map a damaged file as it is
        if (self.dataset_dir / DATA_FILE).exists():
            try:
                check_data_file(self.dataset_dir)
            except DatasetError as err:
                raise DatasetError(f"{err}; pass --overwrite to start the build over") from None
        self._env = lmdb.open(
            str(self.dataset_dir),
            map_size=WRITER_MAP_BYTES,
            subdir=True,
            readahead=False,
            meminit=False,
            max_dbs=0,
        )
        self._txn: lmdb.Transaction | None = None
        if self.count() < keep_records:
            raise DatasetError(
                f"{self.dataset_dir}: store holds {self.count()} records, progress says "
                f"{keep_records}: "
                "the unfinished build is damaged; pass --overwrite to start it over"
            )
        self._truncate(keep_records)

    def count(self) -> int:
        return self._env.stat()["entries"]

    def first_mismatch(self, checksums, labels) -> int | None:
        """The first kept record whose key or bytes disagree with the record table (a resumed
        build checks what an earlier run left before trusting it), or None."""
        index = 0
        with self._env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                if index == len(checksums):
                    break
                if bytes(key) != encode_key(index) or checksum(value) != int(checksums[index]):
                    return index
                index += 1
        return None if index == len(checksums) else index

    def append(self, index: int, label: int, jpeg: bytes) -> None:
        if self._txn is None:
            self._txn = self._env.begin(write=True)
        try:  # a big transaction spills pages to disk here
            stored = self._txn.put(encode_key(index), jpeg, append=True, overwrite=False)
        except lmdb.Error as err:
            raise _write_error(self.dataset_dir, err) from None
        if not stored:
            raise DatasetError(f"{self.dataset_dir}: record {index} written twice")

    def commit(self) -> None:
        try:
            if self._txn is not None:
                txn, self._txn = self._txn, None
                txn.commit()
            self._env.sync(True)
        except lmdb.Error as err:
            raise _write_error(self.dataset_dir, err) from None

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
        digest = content_digest(self.dataset_dir)
        release_env(self.dataset_dir)  # the directory is about to be renamed into place
        return {DATA_FILE: digest}

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._env.close()


_shared_envs: dict[tuple[int, int], tuple[int, lmdb.Environment]] = {}
_shared_lock = threading.Lock()


def _shared_env(dataset_dir: Path) -> lmdb.Environment:
    """The process's one read-only environment for this dataset.

    py-lmdb refuses to open the same files twice in a process (LMDB's locks are per process),
    so every reader of a dataset shares one environment. A forked child inherits the parent's
    entry: it closes its copy (lock-free and read-only, so nothing is shared with the parent's
    state) to release py-lmdb's guard, and opens its own."""
    data_path = Path(dataset_dir) / DATA_FILE
    try:
        stat = data_path.stat()
    except OSError:
        raise DatasetError(f"{dataset_dir}: no {DATA_FILE}") from None
    key = (stat.st_dev, stat.st_ino)
    with _shared_lock:
        pid, env = _shared_envs.get(key, (None, None))
        if pid == os.getpid():
            return env
        if env is not None:
            env.close()
        check_data_file(dataset_dir)
        try:
            env = lmdb.open(
                str(dataset_dir),
                readonly=True,
                lock=False,
                subdir=True,
                readahead=False,
                meminit=False,
                max_readers=4096,
            )
        except lmdb.Error as err:
            raise DatasetError(f"{dataset_dir}: cannot open LMDB ({err})") from None
        _shared_envs[key] = (os.getpid(), env)
        return env


def release_env(dataset_dir: Path) -> None:
    """Close this process's shared environment for the dataset (invalidates its readers' views)."""
    with _shared_lock:
        for key, (pid, env) in list(_shared_envs.items()):
            if pid == os.getpid() and Path(env.path()).resolve() == Path(dataset_dir).resolve():
                env.close()
                del _shared_envs[key]


class LmdbReader:
    """Zero-copy random access; safe to create before DataLoader workers fork, and to use from
    several threads (each gets its own read transaction on the process's shared environment)."""

    def __init__(self, dataset_dir: Path, count: int):
        self.dataset_dir = Path(dataset_dir)
        self.count = count
        self._local = threading.local()
        self._checked_pid = -1

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        # Pickled into worker processes: ship the path, never an open environment.
        return {"dataset_dir": self.dataset_dir, "count": self.count}

    def __setstate__(self, state):
        self.__init__(**state)

    def _txn(self) -> lmdb.Transaction:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            env = _shared_env(self.dataset_dir)
            if self._checked_pid != os.getpid():
                entries = env.stat()["entries"]
                if entries != self.count:
                    raise DatasetError(
                        f"{self.dataset_dir}: LMDB holds {entries} records, manifest says "
                        f"{self.count}"
                    )
                self._checked_pid = os.getpid()
            # Long-lived read transaction: views stay valid while it lives, and nothing writes a
            # finished dataset, so it pins nothing that matters.
            local.txn, local.pid = env.begin(buffers=True), os.getpid()
        return local.txn

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
        """Drop this thread's transaction; the shared environment stays for other readers."""
        txn = getattr(self._local, "txn", None)
        if txn is not None and getattr(self._local, "pid", None) == os.getpid():
            txn.abort()
        self._local = threading.local()


def content_digest(dataset_dir: Path) -> dict:
    """sha256 over every (key, value) in key order.

    An LMDB file's bytes depend on its transaction history (page reuse after a resumed build
    rolls back, junk in page slack), not only on its contents, so the manifest records this
    instead of a file hash: equal contents give equal digests, and verify recomputes it."""
    h = hashlib.sha256()
    count = 0
    env = _shared_env(dataset_dir)
    with env.begin(buffers=True) as txn:
        for key, value in txn.cursor():
            h.update(key)
            h.update(len(value).to_bytes(8, "little"))
            h.update(value)
            count += 1
    return {"records": count, "content_sha256": h.hexdigest()}

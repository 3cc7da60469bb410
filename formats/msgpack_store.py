"""msgpack store: records appended to rolling shard files, located through an offsets index.

Each record is the msgpack array `[index, label, jpeg]`, so a shard is self-describing and can
be streamed front to back without the index (`iter_shard`). The index (`index.npy`) gives each
record's shard, start offset and length; since the JPEG is packed last, its bytes are the
record's final `jpeg_length` bytes and a reader slices them straight out of an mmap: no
msgpack parsing and no copy on the hot path.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np

from formats import DatasetError, write_atomic
from formats.manifest import file_digest
from formats.record import checksum

INDEX_FILE = "index.npy"
INDEX_PARTIAL_FILE = "index.partial"  # raw rows appended during a build; index.npy at the end
# (the builder deletes index.partial once its manifest, which lists only index.npy, exists)
INDEX_DTYPE = np.dtype(
    [("shard", "<u4"), ("offset", "<u8"), ("record_length", "<u4"), ("jpeg_length", "<u4")]
)
DEFAULT_SHARD_BYTES = 256 << 20


def shard_file_name(shard: int) -> str:
    return f"shard-{shard:05d}.msgpack"


def pack_record(index: int, label: int, jpeg: bytes) -> bytes:
    return msgpack.packb([index, label, jpeg], use_bin_type=True)


class MsgpackWriter:
    """Appends records in index order, rolling to a new shard past `shard_bytes`.

    Opening keeps the first `keep_records` records and drops anything after them (a resumed
    build rolls back to its last saved progress), so shard bytes equal an uninterrupted build's.
    """

    def __init__(
        self, dataset_dir: Path, keep_records: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES
    ):
        self.dataset_dir = Path(dataset_dir)
        self.shard_bytes = shard_bytes
        self._index_path = self.dataset_dir / INDEX_PARTIAL_FILE
        self._pending_rows: list[tuple[int, int, int, int]] = []
        self._num_records, self._shard, self._position = self._roll_back(keep_records)
        self._file = open(self.dataset_dir / shard_file_name(self._shard), "ab")

    def _saved_rows(self) -> np.ndarray:
        if not self._index_path.exists():
            return np.zeros(0, INDEX_DTYPE)
        raw = self._index_path.read_bytes()
        usable = len(raw) - len(raw) % INDEX_DTYPE.itemsize
        return np.frombuffer(raw[:usable], INDEX_DTYPE)

    def _roll_back(self, keep_records: int) -> tuple[int, int, int]:
        rows = self._saved_rows()
        if len(rows) < keep_records:
            raise DatasetError(
                f"{self.dataset_dir}: store holds {len(rows)} records, progress says "
                f"{keep_records}: "
                "the unfinished build is damaged; pass --overwrite to start it over"
            )
        shard, position = 0, 0
        if keep_records:
            last = rows[keep_records - 1]
            shard, position = int(last["shard"]), int(last["offset"] + last["record_length"])
        with open(self._index_path, "ab") as f:
            f.truncate(keep_records * INDEX_DTYPE.itemsize)
        shard_path = self.dataset_dir / shard_file_name(shard)
        with open(shard_path, "ab") as f:
            f.truncate(position)
        for stale in self.dataset_dir.glob("shard-*.msgpack"):
            if int(stale.stem.split("-")[1]) > shard:
                stale.unlink()
        return keep_records, shard, position

    def count(self) -> int:
        return self._num_records

    def first_mismatch(self, checksums, labels) -> int | None:
        """The first kept record that does not start where the one before it ends, or whose
        stored index, label or bytes disagree with the record table (a resumed build checks
        what an earlier run left before trusting it), or None."""
        rows = self._saved_rows()[: len(checksums)].tolist()
        if len(rows) < len(checksums):
            return len(rows)
        shard, end, mapped = 0, 0, None
        try:
            for index, (row_shard, offset, record_length, jpeg_length) in enumerate(rows):
                rolled = index > 0 and (row_shard, offset) == (shard + 1, 0)
                if (
                    (row_shard, offset) != (shard, end) and not rolled
                ) or jpeg_length > record_length:
                    return index
                if mapped is None or rolled:
                    if mapped is not None:
                        mapped.close()
                    mapped = _map_file(self.dataset_dir / shard_file_name(row_shard))
                record = mapped[offset : offset + record_length]
                if (
                    len(record) != record_length
                    or _record_head(record) != (index, int(labels[index]))
                    or checksum(record[record_length - jpeg_length :]) != int(checksums[index])
                ):
                    return index
                shard, end = row_shard, offset + record_length
        finally:
            if mapped is not None:
                mapped.close()
        return None

    def append(self, index: int, label: int, jpeg: bytes) -> None:
        if index != self._num_records:
            raise DatasetError(f"{self.dataset_dir}: record {index} out of order")
        record = pack_record(index, label, jpeg)
        with self._naming_errors():
            if self._position and self._position + len(record) > self.shard_bytes:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._shard, self._position = self._shard + 1, 0
                self._file = open(self.dataset_dir / shard_file_name(self._shard), "ab")
            self._file.write(record)
        self._pending_rows.append((self._shard, self._position, len(record), len(jpeg)))
        self._position += len(record)
        self._num_records += 1

    @contextlib.contextmanager
    def _naming_errors(self, path: Path | None = None):
        """A failed write (a full disk) names its file, as every other prep error does."""
        try:
            yield
        except OSError as err:
            if err.filename is not None:
                raise
            path = path or self.dataset_dir / shard_file_name(self._shard)
            raise OSError(err.errno, err.strerror, str(path)) from None

    def commit(self) -> None:
        """Shard bytes are synced before the index rows that point at them."""
        with self._naming_errors():
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._pending_rows:
            with self._naming_errors(self._index_path), open(self._index_path, "ab") as f:
                f.write(np.array(self._pending_rows, INDEX_DTYPE).tobytes())
                f.flush()
                os.fsync(f.fileno())
            self._pending_rows.clear()

    def finish(self) -> dict[str, dict]:
        """Write index.npy; return the digest of every file a reader needs."""
        self.commit()
        self._file.close()
        rows = self._saved_rows()
        write_atomic(self.dataset_dir / INDEX_FILE, lambda f: np.save(f, rows, allow_pickle=False))
        names = sorted(p.name for p in self.dataset_dir.glob("shard-*.msgpack")) + [INDEX_FILE]
        return {name: file_digest(self.dataset_dir / name) for name in names}

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # unsynced bytes a full disk refused: the index never pointed at them
            pass


class MsgpackReader:
    """Zero-copy random access through per-process mmaps; safe to create before forking."""

    def __init__(self, dataset_dir: Path, count: int):
        self.dataset_dir = Path(dataset_dir)
        self.count = count
        path = self.dataset_dir / INDEX_FILE
        try:
            index = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DatasetError(f"{path}: unreadable index ({err})") from None
        if index.dtype != INDEX_DTYPE or len(index) != count:
            raise DatasetError(f"{path}: expected {count} index rows, found {len(index)}")
        # Plain arrays: per-item lookups on a structured array cost more than the decode-free path.
        self._shards = index["shard"].astype(np.int64)
        self._jpeg_starts = (
            index["offset"] + index["record_length"] - index["jpeg_length"]
        ).astype(np.int64)
        self._jpeg_ends = (index["offset"] + index["record_length"]).astype(np.int64)
        self._record_starts = index["offset"].astype(np.int64)
        self._maps: dict[int, mmap.mmap] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _map(self, shard: int) -> mmap.mmap:
        if self._pid != os.getpid():  # forked: mappings are inherited but we reopen per process
            self._maps, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        mapped = self._maps.get(shard)
        if mapped is None:
            with self._lock:
                mapped = self._maps.get(shard)
                if mapped is None:
                    path = self.dataset_dir / shard_file_name(shard)
                    try:
                        with open(path, "rb") as f:
                            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    except (OSError, ValueError) as err:
                        raise DatasetError(f"{path}: cannot map shard ({err})") from None
                    self._maps[shard] = mapped
        return mapped

    def _slice(self, index: int, start: int, end: int) -> memoryview:
        if not 0 <= index < self.count:
            raise IndexError(f"record {index} out of range [0, {self.count})")
        shard = int(self._shards[index])
        mapped = self._map(shard)
        if end > len(mapped):
            raise DatasetError(
                f"{self.dataset_dir / shard_file_name(shard)}: record {index} ends at byte {end} "
                f"but the shard has {len(mapped)} (truncated shard)"
            )
        return memoryview(mapped)[start:end]

    def view(self, index: int) -> memoryview:
        return self._slice(index, int(self._jpeg_starts[index]), int(self._jpeg_ends[index]))

    def record(self, index: int) -> tuple[int, int, memoryview]:
        """Parse the stored `[index, label, jpeg]` (verify checks it against the manifest)."""
        raw = self._slice(index, int(self._record_starts[index]), int(self._jpeg_ends[index]))
        try:
            stored_index, label, _ = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException) as err:
            raise DatasetError(f"{self.dataset_dir}: record {index}: bad msgpack ({err})") from None
        return stored_index, label, self.view(index)

    def shard_sizes(self) -> dict[int, int]:
        """Bytes the index expects in each shard (verify compares with the files)."""
        if not self.count:
            return {}
        ends = np.zeros(int(self._shards.max()) + 1, dtype=np.int64)
        np.maximum.at(ends, self._shards, self._jpeg_ends)  # vectorised: 1.28M records in ~ms
        return {shard: int(end) for shard, end in enumerate(ends.tolist()) if end}

    def close(self) -> None:
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:  # a caller still holds a view; the map dies with the process
                pass
        self._maps = {}


def _map_file(path: Path) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return _EmptyMap()
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class _EmptyMap(bytes):
    def close(self) -> None:
        pass


def _record_head(record) -> tuple | None:
    """(index, label) from the start of a packed `[index, label, jpeg]`, or None."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(record[:32])
    try:
        if unpacker.read_array_header() != 3:
            return None
        return unpacker.unpack(), unpacker.unpack()
    except (ValueError, msgpack.UnpackException, msgpack.OutOfData):
        return None


def iter_shard(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """Stream `(index, label, jpeg)` from one shard without the index (sequential consumers)."""
    with open(path, "rb") as f:
        for index, label, jpeg in msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 30):
            yield index, label, jpeg

"""Datasets over one finished dataset directory (`train-160/`, `val-320/`, LMDB or msgpack alike).

Torch-free on purpose: torch's DataLoader accepts any object with `__len__` and `__getitem__` as a
map-style dataset, so these plug into anyone's training loop while `formats` stays importable
without torch (prep imports `formats`; nothing in `formats/__init__` or prep imports this module).

Process and memory hygiene, because DataLoader workers fork (or unpickle) the dataset:
- the store is opened lazily in the process and thread that reads (the readers reopen after a
  fork), so a dataset may be built, and even read, before workers start;
- per-record metadata lives in a few flat numpy arrays, whose pages forked workers share
  without ever writing them, and image bytes stay in the store's mmap: resident memory per
  worker does not grow with the number of records read;
- `names.txt` (a Python string per record) is loaded only to word an error message.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from formats import DatasetError
from formats.lmdb_store import check_data_file
from formats.manifest import Manifest, load_names, load_records, read_manifest
from formats.msgpack_store import shard_file_name
from formats.names import escape_name
from formats.record import checksum
from formats.store import open_reader


class RecordDataset:
    """Record i -> (JPEG bytes as a memoryview into the store, label). Zero-copy until decode.

    The memoryview is valid while the dataset lives (LMDB: the reader's per-thread transaction;
    msgpack: the shard's mmap); copy it (`bytes(view)`) to keep it longer or to pickle it.
    """

    def __init__(self, dataset_dir: Path):
        self.dataset_dir = Path(dataset_dir)
        self.manifest: Manifest = read_manifest(self.dataset_dir)
        records = load_records(self.dataset_dir, self.manifest)
        # Separate contiguous columns: per-item reads from a structured array are slower, and
        # int64 labels index straight into a torch int64 batch.
        self.labels = np.ascontiguousarray(records["label"], dtype=np.int64)
        self.heights = np.ascontiguousarray(records["height"], dtype=np.int64)
        self.widths = np.ascontiguousarray(records["width"], dtype=np.int64)
        self.checksums = np.ascontiguousarray(records["crc32"], dtype=np.uint32)
        self._reader = open_reader(self.dataset_dir, self.manifest)
        self._names: list[str] | None = None
        self._check_store_files()

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def __len__(self) -> int:
        return self.manifest.count

    def __getitem__(self, index: int) -> tuple[memoryview, int]:
        return self.view(index), int(self.labels[index])

    def view(self, index: int) -> memoryview:
        try:
            return self._reader.view(index)
        except DatasetError as err:
            raise self.record_error(index, str(err)) from None

    def aspect_ratios(self) -> np.ndarray:
        """width / height of every stored image, from the record table (no image is read)."""
        return self.widths / self.heights

    def name(self, index: int) -> str:
        """Source member name of record `index`; loads names.txt on first use only."""
        if self._names is None:
            self._names = load_names(self.dataset_dir, self.manifest)
        return self._names[index]

    def record_error(self, index: int, reason: str) -> DatasetError:
        """One error that names the dataset dir, the record index and its source name."""
        try:
            name = escape_name(self.name(index))
        except (DatasetError, IndexError):
            name = "name unknown"
        reason = reason.replace(f"{self.dataset_dir}: ", "")  # the prefix below says it once
        try:
            if checksum(self._reader.view(index)) != int(self.checksums[index]):
                reason += " (crc32 differs from records.npy: the stored bytes are corrupt)"
        except (DatasetError, IndexError, ValueError):
            pass
        return DatasetError(f"{self.dataset_dir}: record {index} ({name}): {reason}")

    def _check_store_files(self) -> None:
        """Cheap checks of what a reader would otherwise find only in a worker, mid-epoch:
        the store's files exist, and msgpack shards hold every byte the index points at."""
        if self.manifest.store == "lmdb":
            # a truncated data.mdb: this error, not a SIGBUS later
            check_data_file(self.dataset_dir)
            return
        for shard, needed in self._reader.shard_sizes().items():
            path = self.dataset_dir / shard_file_name(shard)
            size = path.stat().st_size if path.is_file() else -1
            if size < needed:
                # The first record that does not fit names the damage.
                return self._raise_truncated(shard, size)

    def _raise_truncated(self, shard: int, size: int) -> None:
        path = self.dataset_dir / shard_file_name(shard)
        if size < 0:
            raise DatasetError(f"{path}: shard file missing")
        for index in range(len(self)):
            try:
                self._reader.view(index)
            except DatasetError as err:
                raise self.record_error(index, str(err)) from None
        raise DatasetError(f"{path}: {size} bytes, shorter than its index says (truncated shard)")

    def close(self) -> None:
        self._reader.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_names"] = None  # re-read on demand, never shipped to workers
        return state


class ImageDataset(RecordDataset):
    """Record i -> (transform(PIL RGB image), target_transform(label)): ImageFolder's contract,
    so torchvision transforms and a plain DataLoader work unchanged. Decodes with PIL (the
    fast fused decode-to-crop path is train/decode.py)."""

    def __init__(self, dataset_dir: Path, transform=None, target_transform=None):
        super().__init__(dataset_dir)
        self.transform = transform
        self.target_transform = target_transform

    def __getitem__(self, index: int):
        from PIL import Image

        data = self.view(index)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:
            raise self.record_error(index, f"cannot decode ({err})") from None
        label = int(self.labels[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

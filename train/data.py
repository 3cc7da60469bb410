"""Loaders, read top-down: sampler -> plan -> batch -> DataLoader -> (prefetch to the device).

1. sampler (train.samplers): which records form batch b of epoch e on this rank.
2. plan (train.samplers `TrainPlan`, `ValPlan`): a batch's indices plus everything that
   decides its pixels (crop boxes and flips, drawn from per-sample seeds).
3. batch (`BatchBuilder`): one worker turns one plan into one uint8 batch, decoding each JPEG
   straight into its slot of a preallocated tensor (train.decode; train.gpu_decode for
   decode="gpu", where workers only gather bytes), then the recipe's auto-augment per image.
4. DataLoader (`_Core`): torch's, with `batch_size=None` over a sampler of plans and persistent
   workers: no per-sample IPC, no collate; batches come back in shared memory (pinned by
   the DataLoader when CUDA is there).
5. prefetch (train.prefetch.DevicePrefetcher): the next batch's copy to the device and its
   conversion to normalized float `x` run while the model works on the current one.

`TrainLoader` and `ValLoader` implement the contract the trainer codes against
(train.loader_contract: `TrainBatches`, `ValBatches`); a faster loader, or a test stand-in,
implements those and nothing else changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from formats.dataset import RecordDataset
from formats.errors import DatasetError
from train.augment import TrainCrop
from train.decode import decode_crop_into
from train.gpu_decode import EncodedBatch, decode_on_device, encode_batch
from train.loader_contract import Augment
from train.samplers import (TrainBatchSampler, TrainPlan, ValPlan, center_val_batches,
                            rect_val_batches, train_plans, val_plans)

DECODERS = ("cpu", "gpu")


# --- 3. batches -----------------------------------------------------------------------------


@dataclasses.dataclass
class BatchError:
    """A worker's failure, handed back as data so the main process raises it as one clean
    DatasetError (not wrapped in DataLoader's worker traceback)."""

    message: str

    def pin_memory(self, device=None):
        return self


def allocate_images(num_images: int, height: int, width: int, pin: bool) -> torch.Tensor:
    """uint8 NCHW: in shared memory inside a DataLoader worker, else pinned if asked.

    Inside a worker the storage is allocated in shared memory directly, the one private torch
    call in train/ (`_new_shared`, exactly what default_collate does): a plain tensor would be
    copied into shared memory again when the worker sends it."""
    shape = (num_images, 3, height, width)
    if get_worker_info() is not None and num_images:
        template = torch.empty(0, dtype=torch.uint8)
        storage = template._typed_storage()._new_shared(num_images * 3 * height * width, device="cpu")
        return template.new(storage).view(shape)
    return torch.empty(shape, dtype=torch.uint8, pin_memory=pin)


@contextlib.contextmanager
def one_intra_op_thread():
    """Per-image tensors are too small to split across threads: measured here, torch's
    intra-op threads made copy/resize of a 128 px crop ~10x slower on a busy 2-core machine.
    Workers already run with one thread; this covers batches built in the main process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchBuilder:
    """Map-style dataset keyed by plans: builder[plan] -> (images, labels) | EncodedBatch | BatchError."""

    def __init__(self, records: RecordDataset, decode: str, pin: bool, augment: Augment | None = None):
        self.records, self.decode, self.pin, self.augment = records, decode, pin, augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, plan: TrainPlan | ValPlan):
        indices, records = plan.batch.indices, self.records
        boxes, flips = plan.boxes_and_flips(records.heights, records.widths)
        labels = torch.from_numpy(records.labels[indices])
        seeds = plan.sample_seeds() if self.augment is not None else None
        try:
            if self.decode == "gpu":
                return encode_batch(records, indices, boxes, flips, plan.out_size, labels, seeds)
            images = allocate_images(len(indices), *plan.out_size, pin=self.pin)
            with one_intra_op_thread() if get_worker_info() is None else contextlib.nullcontext():
                self.decode_into(images, indices, boxes, flips)
                if seeds is not None:
                    self.augment(images, seeds)
        except DatasetError as err:
            return BatchError(str(err))
        return images, labels

    def decode_into(self, images: torch.Tensor, indices: np.ndarray, boxes: list, flips: list) -> None:
        records, heights, widths = self.records, self.records.heights, self.records.widths
        for slot, index in enumerate(indices.tolist()):
            data = records.view(index)
            try:
                decode_crop_into(images[slot], data, int(heights[index]), int(widths[index]), boxes[slot], flips[slot])
            except (ValueError, OSError) as err:
                raise records.record_error(index, f"cannot decode ({err})") from None


# --- 4. the DataLoader ----------------------------------------------------------------------


class _Plans:
    """The DataLoader's sampler: the owning loader's current plans, re-read every iteration.

    Holds its loader weakly: no reference cycle, so dropping a loader (a phase switching shard
    directories) stops its persistent workers at once rather than at the next garbage collection."""

    def __init__(self, loader: _Core):
        self._loader = weakref.ref(loader)

    def __iter__(self):
        return self._loader().plans()

    def __len__(self) -> int:
        return len(self._loader())


class _WorkerPids:
    """worker_init_fn: each worker writes its pid into a shared-memory table."""

    def __init__(self, num_workers: int) -> None:
        self.pids = torch.zeros(max(num_workers, 1), dtype=torch.int64).share_memory_()

    def __call__(self, worker_id: int) -> None:
        self.pids[worker_id] = os.getpid()


class _Core:
    """What both loaders share: the store, the DataLoader, GPU decode and error surfacing.

    Workers stop when the DataLoader and its iterator are freed (torch's iterator stops them
    in its finalizer): `close()` ends this loader's running iterations and drops the
    DataLoader; without cycles, dropping the loader does the same at once."""

    def setup(self, dataset_dir: Path, workers: int, decode: str, device: str | None,
              augment: Augment | None = None) -> None:
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.records = RecordDataset(dataset_dir)
        self.dataset_dir = self.records.dataset_dir
        self.num_images, self.num_classes = len(self.records), self.records.num_classes
        self.decode, self.device, self.augment = decode, None, augment
        if decode == "gpu":
            self.device = torch.device(device or "cuda")
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("decode='gpu' needs CUDA (nvJPEG); use decode='cpu'")
        pin = decode == "cpu" and torch.cuda.is_available()
        builder = BatchBuilder(self.records, decode, pin=pin and workers == 0,
                               augment=augment if decode == "cpu" else None)
        self._pids = _WorkerPids(workers)
        self._loader: DataLoader | None = DataLoader(
            builder, batch_size=None, sampler=_Plans(self), num_workers=workers,
            persistent_workers=workers > 0, pin_memory=pin and workers > 0,
            worker_init_fn=self._pids if workers > 0 else None)
        self._iterations: weakref.WeakSet = weakref.WeakSet()

    def __len__(self) -> int:
        raise NotImplementedError

    def plans(self):
        raise NotImplementedError

    def __iter__(self):
        iteration = self._batches()
        self._iterations.add(iteration)
        return iteration

    def _batches(self):
        if self._loader is None:
            raise RuntimeError(f"{self.dataset_dir}: the loader is closed")
        for item in self._loader:
            if isinstance(item, BatchError):
                raise DatasetError(item.message)
            if isinstance(item, EncodedBatch):
                item = decode_on_device(item, self.device, self.records, self.augment)
            yield item

    def worker_pids(self) -> list[int]:
        """PIDs of the persistent workers (empty before the first iteration or with 0 workers)."""
        return [pid for pid in self._pids.pids.tolist() if pid > 0] if self._loader is not None else []

    def close(self) -> None:
        """Stop the workers now rather than at garbage collection."""
        for iteration in list(self._iterations):
            iteration.close()
        self._loader = None


# --- the two loaders ------------------------------------------------------------------------


class TrainLoader(_Core):
    """One rank's training batches (train.loader_contract.TrainBatches).

    decode="cpu": images are CPU tensors (pinned when CUDA is available). decode="gpu": images
    come back on `device` (default "cuda"), decoded by nvJPEG; workers only read bytes.
    `augment` (train.auto_augment.AutoAugment) runs per image after the crop.
    """

    def __init__(self, dataset_dir: Path, batch_size: int, crop: TrainCrop, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 2, decode: str = "cpu", device: str | None = None,
                 augment: Augment | None = None):
        self.setup(dataset_dir, workers, decode, device, augment)
        self.sampler = TrainBatchSampler(self.num_images, batch_size, rank=rank, world_size=world_size, seed=seed)
        self.batch_size = batch_size
        self.seed = seed
        self.set_crop(crop)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iterations yield epoch `epoch` from batch `start_batch` (a resume inside an epoch)."""
        self.sampler.set_epoch(epoch, start_batch)

    def set_crop(self, crop: TrainCrop) -> None:
        """New crop_size / min_scale from the next iteration on; workers and stores stay."""
        if not isinstance(crop, TrainCrop):
            raise TypeError(f"crop must be a TrainCrop, got {type(crop).__name__}")
        self.crop = crop

    def __len__(self) -> int:
        return len(self.sampler)

    def plans(self):
        return train_plans(self.sampler, self.crop, self.seed)


class ValLoader(_Core):
    """One rank's validation batches (train.loader_contract.ValBatches). rect=False: resize shorter side to
    crop_size / crop_ratio, center crop. rect=True: imagenet18's aspect-ratio batches."""

    def __init__(self, dataset_dir: Path, batch_size: int, crop_size: int, *, rank: int = 0, world_size: int = 1,
                 workers: int = 2, rect: bool = False, crop_ratio: float = 0.875, decode: str = "cpu",
                 device: str | None = None):
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.setup(dataset_dir, workers, decode, device)
        self.rect, self.crop_ratio, self.batch_size = rect, crop_ratio, batch_size
        if rect:
            self.batches = rect_val_batches(self.records.aspect_ratios(), batch_size, rank=rank, world_size=world_size)
        else:
            self.batches = center_val_batches(self.num_images, batch_size, rank=rank, world_size=world_size)
        self.set_crop_size(crop_size)

    def set_crop_size(self, crop_size: int) -> None:
        """A new validation crop from the next iteration on (same batches, workers and store)."""
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        self.crop_size = crop_size

    @property
    def num_images_on_rank(self) -> int:
        return sum(len(batch.indices) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def plans(self):
        return val_plans(self.batches, self.crop_size, self.rect, self.crop_ratio)

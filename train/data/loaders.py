"""`TrainLoader` and `ValLoader`: sampler -> plan -> batch -> worker threads or processes."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from formats import DatasetError
from formats.dataset import RecordDataset
from train.data.batches import BatchBuilder, BatchError
from train.data.constants import DECODERS, DEFAULT_VAL_CROP_RATIO
from train.data.contract import Augment
from train.data.crops import TrainCrop
from train.data.decode import backend as decode_backend
from train.data.gpu_decode import EncodedBatch, decode_on_device
from train.data.ring import BatchRing
from train.data.samplers import (
    TrainBatchSampler,
    center_val_batches,
    rect_val_batches,
    train_plans,
    val_plans,
)
from train.data.threads import WorkerThreads

EXECUTORS = ("threads", "processes")
RING_SLOTS = 5  # the consumer's batch and the one before it, one ready, two being filled


def choose_executor(decode: str, augment: Augment | None) -> str:
    """Threads where the workers' per-image work runs without the GIL (see the module doc)."""
    if decode == "gpu" or (augment is None and decode_backend() == "native"):
        return "threads"
    return "processes"


# --- 4. workers: threads, or the DataLoader's processes ------------------------------------


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


def check_loader_args(decode: str, workers: int, executor: str | None) -> None:
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if executor is not None and executor not in EXECUTORS:
        raise ValueError(
            f"executor must be one of {EXECUTORS} or None (the loader's choice), got {executor!r}"
        )


class _Core:
    """What both loaders share: the store, the workers, GPU decode and error surfacing."""

    def setup(
        self,
        dataset_dir: Path,
        workers: int,
        decode: str,
        device: str | None,
        augment: Augment | None = None,
        executor: str | None = None,
    ) -> None:
        check_loader_args(decode, workers, executor)
        self.records = RecordDataset(dataset_dir)
        self.dataset_dir = self.records.dataset_dir
        self.num_images, self.num_classes = len(self.records), self.records.num_classes
        self.decode, self.device, self.augment, self.workers = decode, None, augment, workers
        if decode == "gpu":
            self.device = torch.device(device or "cuda")
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("decode='gpu' needs CUDA (nvJPEG); use decode='cpu'")
        self.executor = executor or choose_executor(decode, augment)
        pin = decode == "cpu" and torch.cuda.is_available()
        self._iterations: weakref.WeakSet = weakref.WeakSet()
        self._loader: DataLoader | None = None
        self._threads: WorkerThreads | None = None
        builder = BatchBuilder(
            self.records,
            decode,
            pin=pin and workers == 0,
            augment=augment if decode == "cpu" else None,
        )
        if self.executor == "threads":
            ring = BatchRing(RING_SLOTS, pin) if decode == "cpu" else None
            self._threads = WorkerThreads(
                builder, workers, ring, name=f"loader-{self.dataset_dir.name}"
            )
            return
        self._pids = _WorkerPids(workers)
        self._loader = DataLoader(
            builder,
            batch_size=None,
            sampler=_Plans(self),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin and workers > 0,
            worker_init_fn=self._pids if workers > 0 else None,
        )

    def __len__(self) -> int:
        raise NotImplementedError

    def plans(self):
        raise NotImplementedError

    def __iter__(self):
        """One iteration at a time: a new one closes the last (as a DataLoader with persistent
        workers resets its one iterator)."""
        for running in list(self._iterations):
            running.close()
        iteration = self._batches()
        self._iterations.add(iteration)
        return iteration

    def _batches(self):
        if self._loader is None and self._threads is None:
            raise RuntimeError(f"{self.dataset_dir}: the loader is closed")
        items = (
            self._threads.batches(self.plans()) if self._threads is not None else iter(self._loader)
        )
        try:
            for item in items:
                if isinstance(item, BatchError):
                    raise DatasetError(item.message)
                if isinstance(item, EncodedBatch):
                    item = decode_on_device(item, self.device, self.records, self.augment)
                yield item
        finally:
            # A caller that keeps the error's traceback keeps this frame: it must not keep the
            # DataLoader's iterator (and so its worker processes) alive past close().
            del items

    def worker_pids(self) -> list[int]:
        """PIDs of the persistent worker processes (none for threads, before the first
        iteration or with 0 workers)."""
        if self._loader is None or self.workers == 0:
            return []
        return [pid for pid in self._pids.pids.tolist() if pid > 0]

    def close(self) -> None:
        """Stop the workers now rather than at garbage collection."""
        for iteration in list(self._iterations):
            iteration.close()
        self._loader = self._threads = None


# --- the two loaders ------------------------------------------------------------------------


class TrainLoader(_Core):
    """One rank's training batches (train.data.contract.TrainBatches). (more: docs/DESIGN.md)"""

    def __init__(
        self,
        dataset_dir: Path,
        batch_size: int,
        crop: TrainCrop,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        workers: int = 2,
        decode: str = "cpu",
        device: str | None = None,
        augment: Augment | None = None,
        executor: str | None = None,
        color_jitter: float = 0.0,
        random_erasing: float = 0.0,
        repeat_aug: int = 1,
    ):
        if not 0 <= random_erasing <= 1:
            raise ValueError(
                f"random_erasing must be a probability in [0, 1], got {random_erasing}"
            )
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        self.setup(dataset_dir, workers, decode, device, augment, executor)
        self.sampler = TrainBatchSampler(
            self.num_images,
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            repeat_aug=repeat_aug,
        )
        self.batch_size = batch_size
        self.seed = seed
        self.color_jitter, self.random_erasing = color_jitter, random_erasing
        self.set_crop(crop)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iterations yield epoch `epoch` from batch `start_batch` (a resume mid-epoch)."""
        self.sampler.set_epoch(epoch, start_batch)

    def set_crop(self, crop: TrainCrop) -> None:
        """New crop_size / min_scale from the next iteration on; workers and stores stay."""
        if not isinstance(crop, TrainCrop):
            raise TypeError(f"crop must be a TrainCrop, got {type(crop).__name__}")
        self.crop = crop

    def __len__(self) -> int:
        return len(self.sampler)

    def plans(self):
        return train_plans(
            self.sampler, self.crop, self.seed, self.color_jitter, self.random_erasing
        )


class ValLoader(_Core):
    """One rank's validation batches (train.data.contract.ValBatches). rect=False: resize the
    shorter side to resize_size (default crop_size / crop_ratio), center crop; rect=True:
    imagenet18's aspect-ratio batches."""

    def __init__(
        self,
        dataset_dir: Path,
        batch_size: int,
        crop_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 2,
        rect: bool = False,
        crop_ratio: float = DEFAULT_VAL_CROP_RATIO,
        resize_size: int | None = None,
        decode: str = "cpu",
        device: str | None = None,
        executor: str | None = None,
    ):
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.setup(dataset_dir, workers, decode, device, executor=executor)
        self.rect, self.crop_ratio, self.batch_size = rect, crop_ratio, batch_size
        if rect:
            self.batches = rect_val_batches(
                self.records.aspect_ratios(), batch_size, rank=rank, world_size=world_size
            )
        else:
            self.batches = center_val_batches(
                self.num_images, batch_size, rank=rank, world_size=world_size
            )
        self.set_crop_size(crop_size, resize_size)

    def set_crop_size(self, crop_size: int, resize_size: int | None = None) -> None:
        """A new validation crop (and resize before it; None: crop_size / crop_ratio) from the
        next iteration on (same batches, workers and store)."""
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if resize_size is not None and resize_size < crop_size:
            raise ValueError(f"resize_size must be >= crop_size {crop_size}, got {resize_size}")
        self.crop_size, self.resize_size = crop_size, resize_size

    @property
    def num_images_on_rank(self) -> int:
        return sum(len(batch.indices) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def plans(self):
        resize_size = self.resize_size or round(self.crop_size / self.crop_ratio)
        return val_plans(self.batches, self.crop_size, self.rect, resize_size)

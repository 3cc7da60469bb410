"""Loaders: uint8 batches of train crops (random-resized + flip) and validation crops (center or
rect), one rank's share under DDP.

Whole batches are built per worker: a torch DataLoader with `batch_size=None` iterates a
sampler of batch *plans* (record indices + everything that decides their pixels), and each
worker turns one plan into one batch, decoding every image straight into a preallocated uint8
NCHW tensor (in shared memory in a worker, so the hand-over to the main process copies nothing;
in pinned memory when built in the main process and CUDA is there; the DataLoader pins worker
batches). No per-sample IPC, no collate.

What a batch holds depends only on its plan, and a plan only on (seed, epoch, rank, world_size,
batch) and the current crop: a sample's augmentation RNG is seeded from (seed, epoch, its
position in the epoch's permutation). So 0, 1 or 8 workers give the same bits, and
`set_epoch(e, start_batch=k)` replays batches k.. of epoch e exactly.

Phase changes: the crop travels in each plan, so `set_crop` / `set_crop_size` take effect from
the next iteration (epoch), with the same persistent workers and open stores (FFCV's in-place
decoder resize, without shared state to keep in sync).
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from formats.dataset import RecordDataset
from formats.errors import DatasetError
from train.augment import TrainCrop, center_crop_box, rect_crop_box, rect_target_size
from train.decode import BatchDecodeError, decode_crop_batch_gpu, decode_crop_into
from train.samplers import (
    TrainBatchIndices, TrainBatchSampler, ValBatchIndices, center_val_batches, rect_val_batches, sample_seed,
)

DECODERS = ("cpu", "gpu")


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    batch: TrainBatchIndices
    crop: TrainCrop
    seed: int

    @property
    def out_size(self) -> tuple[int, int]:
        return self.crop.crop_size, self.crop.crop_size

    def boxes_and_flips(self, heights: np.ndarray, widths: np.ndarray):
        boxes, flips = [], []
        for slot, index in enumerate(self.batch.indices.tolist()):
            position = self.batch.first_position + slot
            rng = random.Random(sample_seed(self.seed, self.batch.epoch, position))
            boxes.append(self.crop.box(int(heights[index]), int(widths[index]), rng))
            flips.append(rng.random() < 0.5)
        return boxes, flips


@dataclasses.dataclass(frozen=True)
class ValPlan:
    batch: ValBatchIndices
    out_size: tuple[int, int]
    rect: bool
    crop_ratio: float

    def boxes_and_flips(self, heights: np.ndarray, widths: np.ndarray):
        out_height, out_width = self.out_size
        boxes = []
        for index in self.batch.indices.tolist():
            height, width = int(heights[index]), int(widths[index])
            if self.rect:
                boxes.append(rect_crop_box(height, width, out_height, out_width))
            else:
                boxes.append(center_crop_box(height, width, out_height, self.crop_ratio))
        return boxes, [False] * len(boxes)


@dataclasses.dataclass
class BatchError:
    """A worker's failure, handed back as data so the main process raises it as one clean
    DatasetError (not wrapped in DataLoader's worker traceback)."""

    message: str

    def pin_memory(self, device=None):
        return self


@dataclasses.dataclass
class EncodedBatch:
    """decode="gpu": the JPEG bytes of a batch (one uint8 tensor) and where to crop them."""

    indices: np.ndarray
    data: torch.Tensor
    offsets: list[int]  # image i is data[offsets[i]:offsets[i + 1]]
    sizes: list[tuple[int, int]]  # stored (height, width), checked against the decode
    boxes: list
    flips: list[bool]
    out_size: tuple[int, int]
    labels: torch.Tensor

    def pin_memory(self, device=None):
        return self


def allocate_images(num_images: int, height: int, width: int, pin: bool) -> torch.Tensor:
    """uint8 NCHW: in shared memory inside a DataLoader worker (as default_collate does, so
    sending it to the main process is free), else pinned if asked."""
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

    def __init__(self, records: RecordDataset, decode: str, pin: bool):
        self.records = records
        self.decode = decode
        self.pin = pin

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, plan: TrainPlan | ValPlan):
        indices = plan.batch.indices
        records = self.records
        boxes, flips = plan.boxes_and_flips(records.heights, records.widths)
        labels = torch.from_numpy(records.labels[indices])
        try:
            if self.decode == "gpu":
                return self._encoded(plan, boxes, flips, labels)
            images = allocate_images(len(indices), *plan.out_size, pin=self.pin)
            with one_intra_op_thread() if get_worker_info() is None else contextlib.nullcontext():
                self._decode_into(images, indices, boxes, flips)
        except DatasetError as err:
            return BatchError(str(err))
        return images, labels

    def _decode_into(self, images: torch.Tensor, indices: np.ndarray, boxes: list, flips: list) -> None:
        records, heights, widths = self.records, self.records.heights, self.records.widths
        for slot, index in enumerate(indices.tolist()):
            data = records.view(index)
            try:
                decode_crop_into(images[slot], data, int(heights[index]), int(widths[index]), boxes[slot], flips[slot])
            except (ValueError, OSError) as err:
                raise records.record_error(index, f"cannot decode ({err})") from None

    def _encoded(self, plan, boxes, flips, labels) -> EncodedBatch:
        views = [self.records.view(index) for index in plan.batch.indices.tolist()]
        # int64 explicitly: an empty (padding) val batch would otherwise give float offsets.
        offsets = np.concatenate([[0], np.cumsum([len(view) for view in views], dtype=np.int64)]).astype(np.int64).tolist()
        data = np.empty(offsets[-1], dtype=np.uint8)
        for view, start, end in zip(views, offsets, offsets[1:]):
            data[start:end] = np.frombuffer(view, dtype=np.uint8)
        sizes = [(int(self.records.heights[i]), int(self.records.widths[i])) for i in plan.batch.indices.tolist()]
        return EncodedBatch(plan.batch.indices, torch.from_numpy(data), offsets, sizes, boxes, flips, plan.out_size, labels)


class _Plans:
    """The DataLoader's sampler: the owning loader's current plans, re-read every iteration.

    Holds its loader weakly: no reference cycle, so dropping a loader (a phase switching shard
    directories) stops its persistent workers at once rather than at the next garbage collection."""

    def __init__(self, loader: "_Loader"):
        self._loader = weakref.ref(loader)

    def __iter__(self):
        return self._loader()._plans()

    def __len__(self) -> int:
        return len(self._loader())


class _Loader:
    """What both loaders share: the store, the DataLoader, GPU decode and error surfacing."""

    def _setup(self, dataset_dir: Path, workers: int, decode: str, device: str | None) -> None:
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.records = RecordDataset(dataset_dir)
        self.dataset_dir = self.records.dataset_dir
        self.num_images = len(self.records)
        self.num_classes = self.records.num_classes
        self.decode = decode
        self.device = None
        if decode == "gpu":
            self.device = torch.device(device or "cuda")
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("decode='gpu' needs CUDA (nvJPEG); use decode='cpu'")
        pin = decode == "cpu" and torch.cuda.is_available()
        self._builder = BatchBuilder(self.records, decode, pin=pin and workers == 0)
        self._loader = DataLoader(
            self._builder, batch_size=None, sampler=_Plans(self), num_workers=workers,
            persistent_workers=workers > 0, pin_memory=pin and workers > 0,
        )

    def __len__(self) -> int:
        raise NotImplementedError

    def _plans(self):
        raise NotImplementedError

    def __iter__(self):
        for item in self._loader:
            if isinstance(item, BatchError):
                raise DatasetError(item.message)
            if isinstance(item, EncodedBatch):
                item = self._decode_on_device(item)
            yield item

    def _decode_on_device(self, batch: EncodedBatch):
        jpegs = [batch.data[start:end] for start, end in zip(batch.offsets, batch.offsets[1:])]
        try:
            images = decode_crop_batch_gpu(jpegs, batch.boxes, batch.flips, batch.out_size, self.device, batch.sizes)
        except BatchDecodeError as err:
            raise self.records.record_error(int(batch.indices[err.position]), err.reason) from None
        return images, batch.labels

    def worker_pids(self) -> list[int]:
        """PIDs of the live persistent workers (empty before the first iteration or with 0 workers)."""
        iterator = getattr(self._loader, "_iterator", None)
        return [worker.pid for worker in getattr(iterator, "_workers", [])]

    def close(self) -> None:
        """Stop the workers now rather than at garbage collection."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


class TrainLoader(_Loader):
    """One rank's training batches: (images uint8 NCHW, labels int64), `len(self)` per epoch.

    decode="cpu": images are CPU tensors (pinned when CUDA is available). decode="gpu": images
    come back on `device` (default "cuda"), decoded by nvJPEG; workers only read bytes.
    """

    def __init__(self, dataset_dir: Path, batch_size: int, crop: TrainCrop, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 2, decode: str = "cpu", device: str | None = None):
        self._setup(dataset_dir, workers, decode, device)
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

    def _plans(self):
        return _train_plans(self.sampler, self.crop, self.seed)


class ValLoader(_Loader):
    """One rank's validation batches; every rank gets `len(self)` batches, some maybe empty, and
    across ranks each image comes exactly once. rect=False: resize shorter side to
    crop_size / crop_ratio, center crop. rect=True: imagenet18's aspect-ratio batches."""

    def __init__(self, dataset_dir: Path, batch_size: int, crop_size: int, *, rank: int = 0, world_size: int = 1,
                 workers: int = 2, rect: bool = False, crop_ratio: float = 0.875, decode: str = "cpu",
                 device: str | None = None):
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self._setup(dataset_dir, workers, decode, device)
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

    def _plans(self):
        return _val_plans(self.batches, self.crop_size, self.rect, self.crop_ratio)


# Plan generators are free functions of the loader's settings at the start of an iteration:
# the DataLoader's iterator keeps one alive, and a method would keep the loader alive with it.
def _train_plans(sampler: TrainBatchSampler, crop: TrainCrop, seed: int):
    for batch in sampler:
        yield TrainPlan(batch, crop, seed)


def _val_plans(batches: list[ValBatchIndices], crop_size: int, rect: bool, crop_ratio: float):
    for batch in batches:
        out_size = rect_target_size(crop_size, batch.aspect_ratio) if rect else (crop_size, crop_size)
        yield ValPlan(batch, out_size, rect, crop_ratio)

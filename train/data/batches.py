"""Plan -> batch: one uint8 NHWC batch from a batch plan, in a worker thread or process."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from torch.utils.data import get_worker_info

from formats import DatasetError
from formats.dataset import RecordDataset
from train.data.contract import Augment
from train.data.decode import decode_crops_into
from train.data.gpu_decode import encode_batch
from train.data.ring import BatchRing

CHUNK_IMAGES = 16  # per native call: enough to amortise its Python, small enough to share a batch


@dataclasses.dataclass
class BatchError:
    """A worker process's failure, handed back as data so the main process raises it as one clean
    DatasetError (not wrapped in DataLoader's worker traceback)."""

    message: str

    def pin_memory(self, device=None):
        return self


@dataclasses.dataclass
class BatchWork:
    """One batch being made: its records, crops, labels and the NHWC memory it is made in."""

    number: int
    plan: object
    indices: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray
    labels: torch.Tensor
    images: np.ndarray | None  # (N, H, W, 3); None for decode="gpu"
    num_chunks: int
    device_ops: object | None  # the prefetcher's share (train.data.device_ops), drawn here


def allocate_images(num_images: int, height: int, width: int, pin: bool) -> torch.Tensor:
    """uint8 NHWC: in shared memory inside a DataLoader worker, else pinned if asked."""
    shape = (num_images, height, width, 3)
    if get_worker_info() is not None and num_images:
        template = torch.empty(0, dtype=torch.uint8)
        storage = template._typed_storage()._new_shared(
            num_images * 3 * height * width, device="cpu"
        )
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
    def __init__(
        self, records: RecordDataset, decode: str, pin: bool = False, augment: Augment | None = None
    ):
        self.records, self.decode, self.pin, self.augment = records, decode, pin, augment

    def __len__(self) -> int:
        return len(self.records)

    # --- worker threads ------------------------------------------------------------------------

    def start(self, plan, number: int, ring: BatchRing | None) -> BatchWork:
        indices = plan.batch.indices
        boxes, flips = plan.boxes_and_flips(self.records.heights, self.records.widths)
        labels = torch.from_numpy(self.records.labels[indices])
        ops = plan.device_ops()  # in a worker thread, not the consumer's
        if self.decode == "gpu":
            return BatchWork(number, plan, indices, boxes, flips, labels, None, 1, ops)
        images = ring.images(number, len(indices), *plan.out_size)
        chunks = -(-len(indices) // CHUNK_IMAGES)
        return BatchWork(number, plan, indices, boxes, flips, labels, images, chunks, ops)

    def fill(self, work: BatchWork, chunk: int) -> None:
        if self.decode == "gpu":
            work.images = encode_batch(
                self.records,
                work.indices,
                work.boxes,
                work.flips,
                work.plan.out_size,
                work.labels,
                work.plan.sample_seeds(),
                work.device_ops,
            )
            return
        start = chunk * CHUNK_IMAGES
        self.decode_into(
            work.images[start : start + CHUNK_IMAGES],
            work.indices[start : start + CHUNK_IMAGES],
            work.boxes[start : start + CHUNK_IMAGES],
            work.flips[start : start + CHUNK_IMAGES],
        )

    def finish(self, work: BatchWork, ring: BatchRing | None):
        """In the consumer's thread: the batch as the loader yields it. An auto-augment runs here
        when threads were asked for explicitly (its policies seed torch's one global generator,
        so they must not run in several threads at once); the loader's own choice for it is
        processes, which run it in parallel."""
        if self.decode == "gpu":
            return work.images  # an EncodedBatch: the loader decodes it on the device
        images = ring.hand_out(work.number, work.images)
        if self.augment is not None:
            with one_intra_op_thread():
                self.augment(images, work.plan.sample_seeds())
        batch = images, work.labels
        return batch if work.device_ops is None else (*batch, work.device_ops)

    def decode_into(
        self, images: np.ndarray, indices: np.ndarray, boxes: np.ndarray, flips: np.ndarray
    ) -> None:
        """Decode records `indices` into `images` (N, H, W, 3); a bad one raises a DatasetError
        naming it."""
        records = self.records
        views = [records.view(index) for index in indices.tolist()]
        failure = decode_crops_into(
            images, views, records.heights[indices], records.widths[indices], boxes, flips
        )
        if failure is not None:
            position, reason = failure
            raise records.record_error(int(indices[position]), f"cannot decode ({reason})")

    # --- worker processes (DataLoader's map-style dataset, keyed by plans) ----------------------

    def __getitem__(self, plan):
        indices, records = plan.batch.indices, self.records
        boxes, flips = plan.boxes_and_flips(records.heights, records.widths)
        labels = torch.from_numpy(records.labels[indices])
        seeds = plan.sample_seeds() if self.augment is not None else None
        try:
            if self.decode == "gpu":  # the loader augments after the decode, on the device
                return encode_batch(
                    records,
                    indices,
                    boxes,
                    flips,
                    plan.out_size,
                    labels,
                    plan.sample_seeds(),
                    plan.device_ops(),
                )
            images = allocate_images(len(indices), *plan.out_size, pin=self.pin)
            with one_intra_op_thread() if get_worker_info() is None else contextlib.nullcontext():
                self.decode_into(images.numpy(), indices, boxes, flips)
                images = images.permute(0, 3, 1, 2)
                if seeds is not None:
                    self.augment(images, seeds)
        except DatasetError as err:
            return BatchError(str(err))
        return with_device_ops((images, labels), plan)


def with_device_ops(batch: tuple, plan) -> tuple:
    """(images, labels), plus the plan's DeviceOps (ColorJitter, random erasing) when it has
    any: train.data.prefetch applies them on the device."""
    ops = plan.device_ops()
    return batch if ops is None else (*batch, ops)

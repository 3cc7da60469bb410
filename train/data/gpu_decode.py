"""decode="gpu": workers gather JPEG bytes; nvJPEG decodes, crops and resizes on the device."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from formats.dataset import RecordDataset
from train.data.crops import Box
from train.data.decode import decode_rgb


@dataclasses.dataclass
class EncodedBatch:
    """The JPEG bytes of a batch (one uint8 tensor) and where to crop them."""

    indices: np.ndarray
    data: torch.Tensor
    offsets: list[int]  # image i is data[offsets[i]:offsets[i + 1]]
    sizes: list[tuple[int, int]]  # stored (height, width), checked against the decode
    boxes: list
    flips: list[bool]
    out_size: tuple[int, int]
    labels: torch.Tensor
    sample_seeds: Sequence[int] | None  # per image (SampleKeys), for augmentation after the decode
    device_ops: object | None  # for the prefetcher (train.data.device_ops.DeviceOps)

    def pin_memory(self, device=None):
        return self


def encode_batch(
    records: RecordDataset,
    indices: np.ndarray,
    boxes: list,
    flips: list,
    out_size: tuple[int, int],
    labels: torch.Tensor,
    sample_seeds: Sequence[int] | None,
    device_ops: object | None = None,
) -> EncodedBatch:
    """In a worker: copy the batch's JPEG bytes into one tensor (one transfer, one decode call)."""
    views = [records.view(index) for index in indices.tolist()]
    # int64 explicitly: an empty (padding) val batch would otherwise give float offsets.
    offsets = (
        np.concatenate([[0], np.cumsum([len(view) for view in views], dtype=np.int64)])
        .astype(np.int64)
        .tolist()
    )
    data = np.empty(offsets[-1], dtype=np.uint8)
    for view, start, end in zip(views, offsets, offsets[1:]):
        data[start:end] = np.frombuffer(view, dtype=np.uint8)
    sizes = [(int(records.heights[i]), int(records.widths[i])) for i in indices.tolist()]
    return EncodedBatch(
        indices,
        torch.from_numpy(data),
        offsets,
        sizes,
        boxes,
        flips,
        out_size,
        labels,
        sample_seeds,
        device_ops,
    )


def decode_on_device(
    batch: EncodedBatch,
    device: torch.device,
    records: RecordDataset,
    augment: Callable[[torch.Tensor, Sequence[int]], None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """(images uint8 NCHW on `device`, labels[, DeviceOps]); a bad image raises a DatasetError
    naming it. auto_augment runs here, on the device, from the same sample seeds as on the CPU."""
    jpegs = [batch.data[start:end] for start, end in zip(batch.offsets, batch.offsets[1:])]
    try:
        images = decode_crop_batch_gpu(
            jpegs, batch.boxes, batch.flips, batch.out_size, device, batch.sizes
        )
    except BatchDecodeError as err:
        raise records.record_error(int(batch.indices[err.position]), err.reason) from None
    if augment is not None and batch.sample_seeds is not None:
        augment(images, batch.sample_seeds)
    if batch.device_ops is not None:
        return images, batch.labels, batch.device_ops
    return images, batch.labels


def decode_crop_batch_gpu(
    jpegs: Sequence[torch.Tensor],
    boxes: Sequence[Box],
    flips: Sequence[bool],
    out_size: tuple[int, int],
    device: torch.device | str,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """uint8 NCHW batch on `device` from CPU uint8 tensors of JPEG bytes. (more: docs/DESIGN.md)"""
    from torchvision.io import ImageReadMode, decode_jpeg

    out_height, out_width = out_size
    device = torch.device(device)
    if not jpegs:
        return torch.empty((0, 3, out_height, out_width), dtype=torch.uint8, device=device)
    try:
        decoded = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        raise _first_bad_jpeg(jpegs) from None
    batch = torch.empty((len(jpegs), 3, out_height, out_width), dtype=torch.float32, device=device)
    for position, (image, (top, left, box_height, box_width), flip) in enumerate(
        zip(decoded, boxes, flips)
    ):
        if sizes is not None and tuple(image.shape[1:]) != tuple(sizes[position]):
            raise BatchDecodeError(
                position,
                f"decoded to {tuple(image.shape[1:])}, "
                f"the record table says {tuple(sizes[position])}",
            )
        crop = image[None, :, top : top + box_height, left : left + box_width].float()
        resized = F.interpolate(
            crop, size=(out_height, out_width), mode="bilinear", antialias=True
        )[0]
        batch[position] = resized.flip(-1) if flip else resized
    return batch.round_().clamp_(0, 255).to(torch.uint8)


class BatchDecodeError(ValueError):
    """Image `position` of a GPU batch is bad; the loader turns it into a record-naming error."""

    def __init__(self, position: int, reason: str):
        super().__init__(f"batch position {position}: {reason}")
        self.position, self.reason = position, reason


def _first_bad_jpeg(jpegs: Sequence[torch.Tensor]) -> BatchDecodeError:
    """nvJPEG says only that the batch failed: find the image by decoding each on the CPU."""
    for position, data in enumerate(jpegs):
        try:
            decode_rgb(data.numpy())
        except (ValueError, OSError) as err:
            return BatchDecodeError(position, f"cannot decode ({err})")
    return BatchDecodeError(0, "nvJPEG failed on the batch, though each image decodes on the CPU")

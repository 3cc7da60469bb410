"""uint8 batch -> normalized float `x` on the device, the next copy overlapping the current step."""

from __future__ import annotations

import functools
import time

import torch

from train.data.constants import IMAGENET_MEAN, IMAGENET_STD


def normalize(
    images: torch.Tensor, dtype: torch.dtype = torch.float32, channels_last: bool = True
) -> torch.Tensor:
    """uint8 NCHW (any device) -> (images / 255 - mean) / std in `dtype`; channels_last if asked.

    Computed in float32 and cast once: subtracting means in bf16 would cost ~0.5 levels of 255.
    """
    mean, inv_std = _mean_and_inv_std(images.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(torch.float32, memory_format=memory_format).sub_(mean).mul_(inv_std)
    return x.to(dtype)


@functools.lru_cache(maxsize=None)
def _mean_and_inv_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a fresh host-to-device copy per batch would sync the stream."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).mul_(255).view(1, 3, 1, 1)
    inv_std = (
        torch.tensor(IMAGENET_STD, dtype=torch.float32).mul_(255).reciprocal_().view(1, 3, 1, 1)
    )
    return mean.to(device), inv_std.to(device)


class DevicePrefetcher:
    """Iterate `loader`'s (images uint8, labels[, DeviceOps]) as (x, labels) on `device`, one
    batch ahead, with the batch's ColorJitter and random erasing (train.data.device_ops).

    `data_wait_seconds` accumulates the time spent blocked on the loader: the time the consumer
    would have computed if data were free (reported beside img/s)."""

    def __init__(
        self,
        loader,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
    ):
        self.loader = loader
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self.data_wait_seconds = 0.0
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.loader)

    def _next_on_device(self, batches):
        started = time.perf_counter()
        try:
            images, labels, *ops = next(batches)  # ops: train.data.device_ops.DeviceOps
        except StopIteration:
            return None
        finally:
            self.data_wait_seconds += time.perf_counter() - started
        if self._stream is None:
            return self._to_x(images.to(self.device), ops), labels.to(self.device)
        with torch.cuda.stream(self._stream):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            return self._to_x(images, ops), labels

    def _to_x(self, images: torch.Tensor, ops: list) -> torch.Tensor:
        """uint8 on the device -> x: ColorJitter on the uint8 batch, normalise, random erasing."""
        if not ops:
            return normalize(images, self.dtype, self.channels_last)
        ops[0].on_uint8(images)
        return ops[0].on_float(normalize(images, self.dtype, self.channels_last))

    def __iter__(self):
        batches = iter(self.loader)
        if self._stream is None:
            while (batch := self._next_on_device(batches)) is not None:
                yield batch
            return
        # The loader's own GPU work (decode="gpu") runs on the side stream too.
        with torch.cuda.stream(self._stream):
            upcoming = self._next_on_device(batches)
        while upcoming is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._stream)
            x, labels = upcoming
            x.record_stream(compute)
            labels.record_stream(compute)
            with torch.cuda.stream(self._stream):
                upcoming = self._next_on_device(batches)
            yield x, labels

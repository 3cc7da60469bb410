"""The loader contract: what `train run` needs from a train or validation loader."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import torch

from train.data.crops import TrainCrop

# Per-image augmentation of the uint8 crops where the batch is made: augment(images uint8 NCHW,
# keys), in place; keys: the per-sample seeds (train.data.samplers.SampleKeys, a Sequence[int])
# (train.data.auto_augment.AutoAugment).
Augment = Callable[[torch.Tensor, Sequence[int]], None]


class TrainBatches(Protocol):
    """One rank's training batches, the contract `train run` relies on. (more: docs/DESIGN.md)"""

    batch_size: int

    def __len__(self) -> int: ...

    # (images, labels), or (images, labels, erase_boxes) with random erasing (the prefetcher
    # zeroes those boxes of the normalised batch: train.data.erasing)
    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def set_crop(self, crop: TrainCrop) -> None: ...

    def close(self) -> None: ...


class ValBatches(Protocol):
    """One rank's validation batches: each image exactly once over all ranks, `len()` equal
    on every rank (so some batches may be EMPTY), a batch's images of one shape."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def set_crop_size(self, crop_size: int, resize_size: int | None = None) -> None: ...

    def close(self) -> None: ...

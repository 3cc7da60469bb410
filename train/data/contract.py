"""The loader contract: what `train run` needs from a train or validation loader."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import torch

from train.data.crops import TrainCrop

# Per-image augmentation after the crop: augment(images uint8 NCHW, sample seeds), in place
# (train.data.auto_augment.AutoAugment).
Augment = Callable[[torch.Tensor, Sequence[int]], None]


class TrainBatches(Protocol):
    """One rank's training batches, the contract `train run` relies on.

    - `iter(loader)` yields `(images, labels)`: images uint8 of shape (N, 3, H, W) with
      N = batch_size and H = W = the crop's side, in either memory format (NCHW or
      channels_last strides); labels int64 (N,). On the CPU (pinned when CUDA is there), or
      on the device for decode="gpu". A loader may reuse batch buffers (train.data.loaders's
      threads do, train.data.ring): a batch stays intact at least until the one after next
      is asked for, until device work queued on the current stream by then (a non_blocking
      copy) is done, and for as long as the caller holds any view of it.
    - `len(loader)` batches per epoch, equal on every rank.
    - `set_epoch(e, start_batch=k)`: the next iteration yields batches k..len-1 of epoch e;
      what batch b holds depends only on (seed, e, rank, world_size, b) and the crop, so any
      number of workers gives the same bits and a resumed epoch replays exactly.
    - `set_crop(crop)`: from the next iteration on, without restarting workers.
    - `close()`: stop the workers now.
    """

    batch_size: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def set_crop(self, crop: TrainCrop) -> None: ...

    def close(self) -> None: ...


class ValBatches(Protocol):
    """One rank's validation batches: each image exactly once over all ranks, `len()` equal
    on every rank (so some batches may be EMPTY), a batch's images of one shape."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def set_crop_size(self, crop_size: int) -> None: ...

    def close(self) -> None: ...

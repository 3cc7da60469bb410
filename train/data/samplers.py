"""Which records go in which batch on which rank, and batch plans; pure numpy, counter-based."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from train.data.crops import (
    CROP_DRAWS,
    TrainCrop,
    rect_batches,
    rect_crop_box,
    rect_target_size,
    resize_center_crop_box,
)


def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of record indices; identical in every process for (seed, epoch)."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return generator.permutation(num_images).astype(np.int64)


_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: SplitMix64's increment
_MASK64 = (1 << 64) - 1
_DRAWS_PER_SAMPLE = 64  # room in each sample's counter range


def _mix64(x):
    """SplitMix64's finalizer, on Python ints (masked) or uint64 arrays (wrapping)."""
    if isinstance(x, int):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(
    seed: int, epoch: int, first_position: int, num_samples: int, num_draws: int
) -> np.ndarray:
    """(num_samples, num_draws) float64 in [0, 1): the draws of the samples at permutation positions
    first_position, first_position + 1, ... of epoch `epoch`. (more: docs/DESIGN.md)"""
    positions = np.arange(first_position, first_position + num_samples, dtype=np.int64)
    return position_uniforms(seed, epoch, positions, 0, num_draws)


def position_uniforms(
    seed: int, epoch: int, positions: np.ndarray, first_draw: int, num_draws: int
) -> np.ndarray:
    """(len(positions), num_draws) float64 in [0, 1): draw slots first_draw .. first_draw +
    num_draws - 1 of the samples at these permutation positions (sample_uniforms' draws)."""
    if not (0 <= first_draw and 0 <= num_draws and first_draw + num_draws <= _DRAWS_PER_SAMPLE):
        raise ValueError(
            f"draw slots {first_draw}..{first_draw + num_draws - 1} are outside "
            f"[0, {_DRAWS_PER_SAMPLE})"
        )
    key = _mix64(((seed & 0xFFFFFFFF) << 32) | (epoch & 0xFFFFFFFF))
    positions = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    counters = positions[:, None] * np.uint64(_DRAWS_PER_SAMPLE) + np.arange(
        first_draw, first_draw + num_draws, dtype=np.uint64
    )
    bits = _mix64(counters * np.uint64(_GOLDEN) + np.uint64(key))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of one sample's augmentation RNG: distinct for every (seed, epoch, position) with
    32-bit seed and epoch, stable across processes (no str hashing, no PYTHONHASHSEED)."""
    return ((seed & 0xFFFFFFFF) << 80) | ((epoch & 0xFFFFFFFF) << 48) | position


class SampleKeys(Sequence):
    """A batch's per-sample randomness, keyed by (seed, epoch, permutation position): as a
    sequence, each sample's seed (sample_seed, for per-image torch RNGs); `uniforms`, each
    sample's counter-based draws (for vectorised ops). Any process, any worker count, after any
    resume: the same keys give the same draws."""

    def __init__(self, seed: int, epoch: int, positions: np.ndarray) -> None:
        self.seed, self.epoch = seed, epoch
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, slot):
        if isinstance(slot, slice):
            return SampleKeys(self.seed, self.epoch, self.positions[slot])
        return sample_seed(self.seed, self.epoch, int(self.positions[slot]))

    def uniforms(self, first_draw: int, num_draws: int) -> np.ndarray:
        return position_uniforms(self.seed, self.epoch, self.positions, first_draw, num_draws)


@dataclasses.dataclass(frozen=True)
class TrainBatchIndices:
    """One rank's batch: record indices, and the permutation position of each of them."""

    epoch: int
    batch: int  # index of this batch within the rank's epoch
    indices: np.ndarray  # int64 record indices
    positions: np.ndarray  # int64, sample i's; first_position + i unless repeat_aug > 1

    @property
    def first_position(self) -> int:  # of sample 0
        return int(self.positions[0])


def repeated_records(permutation: np.ndarray, repeat_aug: int) -> np.ndarray:
    """Record at each position of a repeated-augmentation epoch: every record of `permutation`
    `repeat_aug` times in a row, cut to the epoch length len(permutation) (DeiT's RASampler
    keeps the epoch length too): a function of (seed, epoch, repeat_aug, num_images) only."""
    return np.repeat(permutation, repeat_aug)[: len(permutation)]


class TrainBatchSampler:
    """This rank's batches of one epoch, seeded per epoch, resumable inside it.

    Global micro-batch b holds positions [b*W*B, (b+1)*W*B) of the epoch's order. With
    repeat_aug 1, rank r takes a contiguous slice of it; with repeat_aug N > 1 the order holds
    each record N times in a row and rank r takes every W-th position from b*W*B + r, so a
    record's copies go to different ranks when W >= N (docs/DESIGN.md, repeated augmentation)."""

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        repeat_aug: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        if num_images < batch_size * world_size:
            raise ValueError(
                f"{num_images} images fill no global batch of {batch_size} x {world_size} ranks"
            )
        if repeat_aug < 1:
            raise ValueError(f"repeat_aug must be >= 1, got {repeat_aug}")
        self.num_images = num_images
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.repeat_aug = repeat_aug
        self.epoch = 0
        self.start_batch = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank, equal on every rank."""
        return self.num_images // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate `epoch` from batch `start_batch` (resume), until the next set_epoch."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def permutation(self) -> np.ndarray:
        """The record at each position of the epoch."""
        if self._cached is None or self._cached[0] != self.epoch:
            order = epoch_permutation(self.num_images, self.seed, self.epoch)
            self._cached = (self.epoch, repeated_records(order, self.repeat_aug))
        return self._cached[1]

    def batch_positions(self, batch: int) -> np.ndarray:
        global_first = batch * self.world_size * self.batch_size
        if self.repeat_aug == 1:  # today's contiguous slices: the same order and draws as before
            first = global_first + self.rank * self.batch_size
            return np.arange(first, first + self.batch_size, dtype=np.int64)
        first = global_first + self.rank
        return first + self.world_size * np.arange(self.batch_size, dtype=np.int64)

    def batch_indices(self, batch: int) -> TrainBatchIndices:
        positions = self.batch_positions(batch)
        indices = self.permutation()[positions]
        return TrainBatchIndices(self.epoch, batch, indices, positions)

    def __iter__(self):
        for batch in range(self.start_batch, len(self)):
            yield self.batch_indices(batch)


def deal_batches(batches: list, rank: int, world_size: int) -> list:
    """Rank r's share of whole batches, `batches[r::world_size]`, padded with empty batches to
    ceil(len / world_size) so every rank steps the same number of times."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    share = list(batches[rank::world_size])
    steps = math.ceil(len(batches) / world_size)
    return share + [None] * (steps - len(share))


@dataclasses.dataclass(frozen=True)
class ValBatchIndices:
    indices: np.ndarray  # int64 record indices; empty for a padding batch
    aspect_ratio: float  # mean width/height of the batch (rect validation); 1.0 otherwise


def center_val_batches(
    num_images: int, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> list[ValBatchIndices]:
    """Record order cut into batches, dealt to ranks (the last batch may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.arange(num_images, dtype=np.int64)
    batches = [order[start : start + batch_size] for start in range(0, num_images, batch_size)]
    return [
        ValBatchIndices(indices if indices is not None else order[:0], 1.0)
        for indices in deal_batches(batches, rank, world_size)
    ]


def rect_val_batches(
    aspect_ratios, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> list[ValBatchIndices]:
    """Batches of aspect-ratio neighbours (train.data.crops.rect_batches), dealt to ranks. An empty
    padding batch gets ratio 1.0 (a square crop of nothing)."""
    batches = rect_batches(aspect_ratios, batch_size)
    empty = np.zeros(0, dtype=np.int64)
    return [
        ValBatchIndices(np.asarray(batch[0], dtype=np.int64), batch[1])
        if batch is not None
        else ValBatchIndices(empty, 1.0)
        for batch in deal_batches(batches, rank, world_size)
    ]


# --- plans: a batch's indices and how to crop them ------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    batch: TrainBatchIndices
    crop: TrainCrop
    seed: int
    color_jitter: float = 0.0  # strength
    random_erasing: float = 0.0  # probability per image

    @property
    def out_size(self) -> tuple[int, int]:
        return self.crop.crop_size, self.crop.crop_size

    def sample_seeds(self) -> SampleKeys:
        return SampleKeys(self.seed, self.batch.epoch, self.batch.positions)

    def boxes_and_flips(
        self, heights: np.ndarray, widths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) int64 crop boxes and (N,) bool flips, each sample's from its own draws."""
        indices = self.batch.indices
        uniforms = self.sample_seeds().uniforms(0, CROP_DRAWS + 1)
        boxes = self.crop.boxes(heights[indices], widths[indices], uniforms[:, :CROP_DRAWS])
        return boxes, uniforms[:, CROP_DRAWS] < 0.5

    def device_ops(self):
        """The prefetcher's share of the augmentation (train.data.device_ops.DeviceOps): each
        sample's ColorJitter factors and order, random-erasing box; None when both are off."""
        if not (self.color_jitter or self.random_erasing):
            return None
        from train.data.color import JITTER_DRAWS, JITTER_FIRST_DRAW, jitter_factors
        from train.data.device_ops import DeviceOps
        from train.data.erasing import ERASE_DRAWS, ERASE_FIRST_DRAW, erase_boxes

        keys, ops = self.sample_seeds(), DeviceOps()
        if self.color_jitter:
            uniforms = keys.uniforms(JITTER_FIRST_DRAW, JITTER_DRAWS)
            ops.jitter_factors, ops.jitter_orders = jitter_factors(self.color_jitter, uniforms)
        if self.random_erasing:
            uniforms = keys.uniforms(ERASE_FIRST_DRAW, ERASE_DRAWS)
            ops.erase_boxes = erase_boxes(self.out_size, uniforms, self.random_erasing)
        return ops


@dataclasses.dataclass(frozen=True)
class ValPlan:
    batch: ValBatchIndices
    out_size: tuple[int, int]
    rect: bool
    resize_size: int  # center crop: the shorter side is resized to this first (not rect)

    def sample_seeds(self) -> None:
        return None  # validation is not augmented

    def device_ops(self) -> None:
        return None

    def boxes_and_flips(
        self, heights: np.ndarray, widths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        out_height, out_width = self.out_size
        boxes = np.zeros((len(self.batch.indices), 4), dtype=np.int64)
        for slot, index in enumerate(self.batch.indices.tolist()):
            height, width = int(heights[index]), int(widths[index])
            if self.rect:
                boxes[slot] = rect_crop_box(height, width, out_height, out_width)
            else:
                boxes[slot] = resize_center_crop_box(
                    height, width, self.resize_size, out_height, out_width
                )
        return boxes, np.zeros(len(boxes), dtype=bool)


# Plan generators are free functions of the loader's settings at the start of an iteration:
# the DataLoader's iterator keeps one alive, and a method would keep the loader alive with it.
def train_plans(
    sampler: TrainBatchSampler,
    crop: TrainCrop,
    seed: int,
    color_jitter: float = 0.0,
    random_erasing: float = 0.0,
):
    for batch in sampler:
        yield TrainPlan(batch, crop, seed, color_jitter, random_erasing)


def val_plans(batches: list[ValBatchIndices], crop_size: int, rect: bool, resize_size: int):
    for batch in batches:
        out_size = (
            rect_target_size(crop_size, batch.aspect_ratio) if rect else (crop_size, crop_size)
        )
        yield ValPlan(batch, out_size, rect, resize_size)

"""A recipe's training augmentations, data side: which op runs where (docs/DESIGN.md, augment).

uint8 ops on the cropped batch (auto_augment per image, color_jitter vectorised) run where the
batch is made (a worker, or the device after decode="gpu"); random erasing needs the normalised
float batch, so its boxes travel with the batch and train.data.prefetch applies them; repeat_aug
is the sampler's (train.data.samplers)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The recipe keys the train loader honours; defaults: none of them."""

    auto_augment: str | None = None
    color_jitter: float = 0.0  # strength s: factors uniform in [max(0, 1 - s), 1 + s]
    random_erasing: float = 0.0  # probability per image
    repeat_aug: int = 1  # each sampled image this many times per epoch

    def uint8_ops(self):
        """The train.data.contract.Augment for the uint8 batch, or None when there is none."""
        ops = []
        if self.auto_augment:
            from train.data.auto_augment import AutoAugment

            ops.append(AutoAugment(self.auto_augment))
        if self.color_jitter:
            from train.data.color import ColorJitter

            ops.append(ColorJitter(self.color_jitter))
        if not ops:
            return None
        return ops[0] if len(ops) == 1 else Chain(tuple(ops))


@dataclasses.dataclass(frozen=True)
class Chain:
    """Several Augments in order (timm's: the auto-augment policy, then ColorJitter)."""

    ops: tuple

    def __call__(self, images: torch.Tensor, keys: Sequence[int]) -> None:
        for op in self.ops:
            op(images, keys)

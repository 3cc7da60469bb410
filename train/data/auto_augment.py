"""RandAugment / TrivialAugmentWide / AutoAugment (torchvision v2) per uint8 crop, seeded per
image."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from train.data.constants import AUTO_AUGMENT_POLICIES


def make_policy(name: str):
    from torchvision.transforms import v2

    if name == "ra":
        return v2.RandAugment()
    if name == "ta_wide":
        return v2.TrivialAugmentWide()
    if name == "imagenet":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    raise ValueError(
        f"auto_augment must be one of {', '.join(AUTO_AUGMENT_POLICIES)}, got {name!r}"
    )


def torch_seed(sample_seed: int) -> int:
    """A sample seed (up to 112 bits, train.data.samplers) as a 63-bit seed torch accepts."""
    digest = hashlib.blake2b(sample_seed.to_bytes(16, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class AutoAugment:
    """`augment(images, seeds)`: image i of a uint8 NCHW batch, in place, its draws seeded by
    sample seed seeds[i]."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.policy = make_policy(name)

    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> None:
        # The policies draw their parameters from torch's CPU generator, also for device
        # tensors; fork_rng leaves the caller's stream as it was.
        with torch.random.fork_rng(devices=[]):
            for slot, seed in enumerate(seeds):
                torch.default_generator.manual_seed(torch_seed(seed))
                images[slot] = self.policy(images[slot])

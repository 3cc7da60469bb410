"""timm's RandAugment / AutoAugment ("timm:rand-m6-mstd0.5-inc1", ...) per uint8 crop, seeded
per image: timm's own transforms on PIL images, so a recipe such as RSB A3 gets exactly timm's
augmentation (docs/RECIPES.md)."""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from train.data.auto_augment import torch_seed
from train.data.constants import IMAGENET_MEAN, INSTALL_TIMM, TIMM_AUGMENT_PREFIX

# timm's config strings this key takes: those its transforms_factory hands to
# rand_augment_transform / auto_augment_transform (augmix mixes images: not taken).
TIMM_RAND = ("rand",)
TIMM_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
CHECK_CROP_SIZE = 224  # any side: timm parses a string the same way for every crop size


class TimmAugmentError(ValueError):
    """A timm config string refused: not installed, or one timm does not accept."""


def timm_hparams(crop_size: int) -> dict:
    """What timm's transforms_factory.py passes for a train crop of `crop_size` px: the fill
    colour of geometric ops and the translate range. No interpolation key: timm train.py's
    default `--train-interpolation random` leaves each op its random bilinear/bicubic choice."""
    return {
        "translate_const": int(crop_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
    }


def make_timm_transform(config: str, crop_size: int):
    """timm's transform for `config` (without the "timm:" prefix); TimmAugmentError if timm is
    missing or refuses the string."""
    try:
        from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
    except ImportError:
        raise TimmAugmentError(f"timm augmentations need timm ({INSTALL_TIMM})") from None
    head = config.split("-")[0]
    if head not in TIMM_RAND + TIMM_POLICIES:
        raise TimmAugmentError(
            f"a timm config must start with one of {', '.join(TIMM_RAND + TIMM_POLICIES)}"
        )
    build = rand_augment_transform if head in TIMM_RAND else auto_augment_transform
    try:  # timm asserts or fails to parse a number: any of these is a bad string
        return build(config, timm_hparams(crop_size))
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise TimmAugmentError(f"timm refuses it: {err or type(err).__name__}") from None


def check_timm_config(config: str) -> None:
    """TimmAugmentError (one line) unless timm is installed and builds `config`."""
    make_timm_transform(config, CHECK_CROP_SIZE)


def numpy_seed(seed: int) -> list[int]:
    """A 63-bit seed as the 32-bit words numpy's legacy global RandomState takes."""
    return [seed & 0xFFFFFFFF, seed >> 32]


class TimmAugment:
    """`augment(images, seeds)`: image i of a uint8 NCHW batch, in place, timm's transform with
    Python's `random` and numpy's global RNG (both of which timm draws from) seeded by sample
    seed seeds[i], as train.data.auto_augment.AutoAugment seeds torch."""

    def __init__(self, name: str) -> None:
        self.name = name  # the recipe's value, "timm:..."
        self.config = name.removeprefix(TIMM_AUGMENT_PREFIX)
        self.transforms: dict[int, object] = {}  # by crop side: the crop ramp changes it
        check_timm_config(self.config)  # a bad string fails here, not in a loader worker

    def transform_for(self, crop_size: int):
        if crop_size not in self.transforms:
            self.transforms[crop_size] = make_timm_transform(self.config, crop_size)
        return self.transforms[crop_size]

    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> None:
        from PIL import Image

        # PIL needs host memory: a device batch (--decode gpu) makes one round trip per batch.
        host = images.cpu()
        transform = self.transform_for(min(host.shape[-2:]))
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            for slot, seed in enumerate(seeds):
                image_seed = torch_seed(seed)
                random.seed(image_seed)
                np.random.seed(numpy_seed(image_seed))
                hwc = host[slot].permute(1, 2, 0).numpy()  # a view: written back in place
                hwc[...] = np.asarray(transform(Image.fromarray(hwc)))
        finally:  # the caller's streams as they were
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        if host is not images:
            images.copy_(host, non_blocking=False)

"""A recipe's training augmentations, data side: auto_augment in the workers, color_jitter and
random_erasing drawn there and applied by the prefetcher (train.data.device_ops), repeat_aug in
the sampler. Why there: docs/DESIGN.md, "Issue 18"."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The recipe keys the train loader honours; defaults: none of them."""

    auto_augment: str | None = None
    color_jitter: float = 0.0  # strength s: factors uniform in [max(0, 1 - s), 1 + s]
    random_erasing: float = 0.0  # probability per image
    repeat_aug: int = 1  # each sampled image this many times per epoch

    def worker_ops(self):
        """The train.data.contract.Augment the batch builder runs, or None."""
        if not self.auto_augment:
            return None
        from train.data.auto_augment import AutoAugment

        return AutoAugment(self.auto_augment)

    def loader_kwargs(self) -> dict:
        """TrainLoader's keyword arguments for these augmentations."""
        return {
            "augment": self.worker_ops(),
            "color_jitter": self.color_jitter,
            "random_erasing": self.random_erasing,
            "repeat_aug": self.repeat_aug,
        }

"""A recipe's training augmentations, data side: auto_augment in the workers, color_jitter and
random_erasing drawn there and applied by the prefetcher (train.data.device_ops), repeat_aug in
the sampler. Why there: docs/DESIGN.md, "Issue 18"."""

from __future__ import annotations

import dataclasses

from train.data.constants import AUTO_AUGMENT_POLICIES, TIMM_AUGMENT_PREFIX


def auto_augment_problem(name: str) -> str | None:
    """Why `name` is no auto_augment ("must be ..."), None if it is one; a timm string is
    checked by building timm's transform (which also needs timm installed)."""
    if name in AUTO_AUGMENT_POLICIES:
        return None
    if not name.startswith(TIMM_AUGMENT_PREFIX):
        return f"must be one of {', '.join(AUTO_AUGMENT_POLICIES)} or {TIMM_AUGMENT_PREFIX}<config>"
    from train.data.timm_augment import TimmAugmentError, check_timm_config

    try:
        check_timm_config(name.removeprefix(TIMM_AUGMENT_PREFIX))
    except TimmAugmentError as err:
        return str(err)
    return None


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
        if self.auto_augment.startswith(TIMM_AUGMENT_PREFIX):
            from train.data.timm_augment import TimmAugment

            return TimmAugment(self.auto_augment)
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

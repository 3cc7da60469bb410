"""The one rule for when loaders are rebuilt and when adjusted in place; pure."""

from __future__ import annotations

from dataclasses import dataclass, fields

from train.data.constants import DEFAULT_VAL_CROP_RATIO
from train.plan.schedule import Phase, Schedule, ShardDirs

# A change in TRAIN_/VAL_LOADER_FIELDS rebuilds that loader (new shards, new batch sampler);
# a change in IN_PLACE_FIELDS alone is applied to the live loader (`set_crop`,
# `set_crop_size`), its workers and open stores staying. Validation batches are sized from
# batch_size, and rect_val needs a different sampler.
TRAIN_LOADER_FIELDS = ("prep_size", "batch_size")
VAL_LOADER_FIELDS = ("val_prep_size", "rect_val", "batch_size")
IN_PLACE_FIELDS = ("crop_size", "min_scale", "val_crop_size", "val_resize_size")


@dataclass(frozen=True)
class LoaderSettings(ShardDirs):
    """What the loaders of one epoch are built from (field order = Phase's)."""

    prep_size: int
    crop_size: int  # this epoch's (a crop ramp moves it every epoch)
    batch_size: int
    min_scale: float
    rect_val: bool
    val_prep_size: int
    val_crop_size: int
    val_resize_size: int  # resolved: the phase's, else val_crop_size / DEFAULT_VAL_CROP_RATIO


LOADER_KEYS = tuple(f.name for f in fields(LoaderSettings))


@dataclass(frozen=True)
class LoaderChanges:
    """What differs at `epoch` from the epoch before, and what the trainer must do about it.

    `describe()` is the dry-run's "loaders" column."""

    epoch: int
    changed: tuple[str, ...]  # LoaderSettings field names, in field order; all when fresh
    fresh: bool = False

    @property
    def rebuild_train(self) -> bool:
        return any(k in self.changed for k in TRAIN_LOADER_FIELDS)

    @property
    def rebuild_val(self) -> bool:
        return any(k in self.changed for k in VAL_LOADER_FIELDS)

    @property
    def in_place(self) -> tuple[str, ...]:
        """IN_PLACE_FIELDS to set on a live (not rebuilt) loader."""
        kept = {
            "crop_size": not self.rebuild_train,
            "min_scale": not self.rebuild_train,
            "val_crop_size": not self.rebuild_val,
            "val_resize_size": not self.rebuild_val,
        }
        return tuple(k for k in self.changed if k in IN_PLACE_FIELDS and kept[k])

    def describe(self) -> str:
        if self.fresh:
            return "build train+val"
        rebuilt = [
            name
            for name, flag in (("train", self.rebuild_train), ("val", self.rebuild_val))
            if flag
        ]
        parts = [f"rebuild {'+'.join(rebuilt)}"] if rebuilt else []
        if self.in_place:
            parts.append(f"in place: {', '.join(self.in_place)}")
        return "; ".join(parts)


def val_resize_size(p: Phase) -> int:
    """The shorter side the validation image is resized to before its center crop."""
    return p.val_resize_size or round(p.val_crop_size / DEFAULT_VAL_CROP_RATIO)


def loader_settings(schedule: Schedule, epoch: int) -> LoaderSettings:
    p = schedule.phase_at(epoch)
    return LoaderSettings(
        p.prep_size,
        p.crop_size_at(epoch),
        p.batch_size,
        p.min_scale,
        p.rect_val,
        p.val_prep_size,
        p.val_crop_size,
        val_resize_size(p),
    )


def loader_changes(schedule: Schedule, epoch: int, *, fresh: bool = False) -> LoaderChanges:
    """What changed at `epoch` since `epoch - 1`.

    `fresh=True` (or epoch 0) means the process holds no loaders yet, as after a resume:
    everything counts as changed, so both loaders are built.
    """
    now = loader_settings(schedule, epoch)
    if fresh or epoch == 0:
        return LoaderChanges(epoch, LOADER_KEYS, fresh=True)
    before = loader_settings(schedule, epoch - 1)
    return LoaderChanges(
        epoch, tuple(k for k in LOADER_KEYS if getattr(now, k) != getattr(before, k))
    )

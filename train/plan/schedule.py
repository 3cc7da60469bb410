"""`Phase` / `Schedule`: the phase keys (docs/DESIGN.md lists them) and the pure queries a run
asks (phase_at, lr_at, crop ramps); no torch."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from formats import split_dir_name
from train.errors import ScheduleError
from train.plan.settings import is_int, is_number, problems, setting

DEFAULT_MIN_SCALE = 0.08
DEFAULT_CROP_MULTIPLE = 32
LR_SHAPES = ("linear", "cosine", "constant", "step", "poly")
POLY_POWER = 2  # MLPerf ResNet-50's polynomial decay: power 2, fixed by its rules (docs/RECIPES.md)
MAX_EPOCHS = 100_000  # far above any recipe; a typo beyond it would hang the dry run's table


def round_crop(value: float, multiple: int) -> int:
    """FFCV's rounding of a ramp's crop: to the nearest multiple (half to even)."""
    return int(round(value / multiple)) * multiple


class ShardDirs:
    """`train-{prep_size}/` and `val-{val_prep_size}/` of a Phase or one epoch's settings."""

    @property
    def train_dir_name(self) -> str:
        return split_dir_name("train", self.prep_size)

    @property
    def val_dir_name(self) -> str:
        return split_dir_name("val", self.val_prep_size)


@dataclass(frozen=True)
class Phase(ShardDirs):
    """One contiguous run of epochs; field names equal the JSON keys. (more: docs/DESIGN.md)"""

    epochs: tuple[int, int]  # [start, end), half-open
    prep_size: int = setting(help="shorter side of the shards read: train-{prep_size}/", low=1)
    crop_size: int | tuple[int, int] = setting(help="training crop, or a ramp [first, last]")
    batch_size: int = setting(help="per GPU, per forward pass", low=1)
    lr: tuple[float, float] = setting(help="LR, or [start, end] following lr_shape")
    min_scale: float = setting(
        DEFAULT_MIN_SCALE, "RandomResizedCrop's lower area bound", low=0, high=1, bounds="(]"
    )
    rect_val: bool = setting(False, "imagenet18's aspect-ratio validation batches")
    val_prep_size: int | None = setting(None, "validation shards [default: prep_size]", low=1)
    val_crop_size: int | None = setting(None, "validation side [default: the last crop]", low=1)
    val_resize_size: int | None = setting(
        None,
        "validation: shorter side resized to this, then the center crop [default: crop / 0.875]",
        low=1,
    )
    lr_shape: str = setting("linear", "how lr moves across the phase's steps", choices=LR_SHAPES)
    accum_steps: int = setting(1, "forward/backward passes per optimizer step", low=1)
    crop_multiple: int = setting(DEFAULT_CROP_MULTIPLE, "rounding of a crop ramp", low=1)

    def __post_init__(self) -> None:
        put = object.__setattr__
        for key in ("epochs", "crop_size"):
            if isinstance(getattr(self, key), list):
                put(self, key, tuple(getattr(self, key)))
        if is_number(self.lr):
            put(self, "lr", (float(self.lr), float(self.lr)))
        elif isinstance(self.lr, (list, tuple)):
            put(self, "lr", tuple(float(x) if is_number(x) else x for x in self.lr))
        if is_int(self.min_scale):
            put(self, "min_scale", float(self.min_scale))
        if self.val_prep_size is None:
            put(self, "val_prep_size", self.prep_size)
        if self.val_crop_size is None:
            ramp = self.crop_ramp
            if ramp is None:
                put(self, "val_crop_size", self.crop_size)
            elif len(ramp) == 2 and is_number(ramp[1]):  # else the check names crop_size
                put(self, "val_crop_size", self._rounded(ramp[1]))

    @property
    def crop_ramp(self) -> tuple[int, int] | None:
        """(first, last) of a crop ramp; None for one crop_size."""
        return self.crop_size if isinstance(self.crop_size, tuple) else None

    def _rounded(self, value: float) -> Any:
        multiple = self.crop_multiple
        return round_crop(value, multiple) if is_int(multiple) and multiple > 0 else value

    def crop_size_at(self, epoch: int) -> int:
        """The training crop of `epoch` (inside this phase)."""
        ramp = self.crop_ramp
        if ramp is None:
            return self.crop_size
        start, end = self.epochs
        first, last = ramp
        return self._rounded(first + (last - first) * (epoch - start) / (end - 1 - start))

    @property
    def num_epochs(self) -> int:
        return self.epochs[1] - self.epochs[0]

    def lr_at_fraction(self, progress: float) -> float:
        """LR at `progress` in [0, 1] of the phase's steps (0 = its first step); not "step"."""
        start, end = self.lr
        if progress == 1:
            return end
        if self.lr_shape == "cosine":
            return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
        if self.lr_shape == "poly":
            return end + (start - end) * (1 - progress) ** POLY_POWER
        return start + (end - start) * progress

    def step_lr(self, epoch: int) -> float:
        """lr_shape "step": the LR of all of `epoch` (geometric from start to end)."""
        start, end = self.lr
        done, last = epoch - self.epochs[0], self.num_epochs - 1
        if done == 0 or start == end:
            return start
        return end if done == last else start * (end / start) ** (done / last)

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """LR of 0-based optimizer `step` of `epoch` (inside this phase)."""
        if self.lr_shape == "step":
            return self.step_lr(epoch)
        done = (epoch - self.epochs[0]) * steps_per_epoch + step
        return self.lr_at_fraction(done / (self.num_epochs * steps_per_epoch))

    def epoch_lr_range(self, epoch: int) -> tuple[float, float]:
        """(LR at the epoch's first step, LR its last step approaches), for the table."""
        if self.lr_shape == "step":
            return self.step_lr(epoch), self.step_lr(epoch)
        done = epoch - self.epochs[0]
        return (
            self.lr_at_fraction(done / self.num_epochs),
            self.lr_at_fraction((done + 1) / self.num_epochs),
        )

    def to_dict(self) -> dict[str, Any]:
        """Our JSON form, every key explicit (what a run saves as its resolved schedule)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("epochs", "lr") + (("crop_size",) if self.crop_ramp else ()):
            out[key] = list(out[key])
        return out


PHASE_KEYS = tuple(f.name for f in fields(Phase))
REQUIRED_KEYS = ("epochs", "prep_size", "crop_size", "batch_size", "lr")


def phase_error(index: int, key: str, message: str) -> ScheduleError:
    return ScheduleError(f"phase {index}, key {key!r}: {message}")


def _check_crops(p: Phase, i: int) -> None:
    ramp = p.crop_ramp
    if ramp is not None:
        if not (len(ramp) == 2 and all(is_int(x) and x > 0 for x in ramp)):
            raise phase_error(
                i,
                "crop_size",
                f"must be a positive integer or a ramp [first, last], got {list(ramp)}",
            )
        if p.num_epochs < 2:
            raise phase_error(
                i, "crop_size", "a ramp [first, last] needs a phase of 2 or more epochs"
            )
    crops = {p.crop_size_at(e) for e in range(*p.epochs)} if ramp else {p.crop_size}
    for crop in sorted(crops, reverse=True):
        if not is_int(crop) or crop <= 0:
            what = f"ramp {list(ramp)} rounds to {crop} (lower crop_multiple)" if ramp else None
            raise phase_error(i, "crop_size", what or f"must be a positive integer, got {crop!r}")
        if crop > p.prep_size:
            raise phase_error(
                i,
                "crop_size",
                f"{crop} > prep_size {p.prep_size}; read larger shards (raise "
                "prep_size) or crop smaller",
            )


def _check_lr(p: Phase, i: int) -> None:
    lr = p.lr
    if not (isinstance(lr, tuple) and len(lr) == 2 and all(is_number(x) for x in lr)):
        raise phase_error(i, "lr", f"must be a number or [start, end], got {lr!r}")
    if not all(math.isfinite(x) and x >= 0 for x in lr):
        raise phase_error(i, "lr", f"must be finite and >= 0, got {list(lr)}")
    if p.lr_shape == "constant" and lr[0] != lr[1]:
        raise phase_error(i, "lr", f"lr_shape 'constant' needs one LR, got {list(lr)}")
    if p.lr_shape == "step" and min(lr) <= 0 and lr[0] != lr[1]:
        raise phase_error(
            i,
            "lr",
            "lr_shape 'step' multiplies by a constant factor per epoch: start and end "
            f"must be > 0, got {list(lr)}",
        )


def check_phase(p: Phase, i: int) -> None:
    """The declared keys (train.plan.settings), then what only this module knows."""
    ep = p.epochs
    if not (isinstance(ep, tuple) and len(ep) == 2 and all(is_int(x) for x in ep)):
        raise phase_error(i, "epochs", f"must be [start, end] integers, got {ep!r}")
    if ep[0] < 0 or ep[0] >= ep[1]:
        raise phase_error(i, "epochs", f"needs 0 <= start < end (half-open), got {list(ep)}")
    if ep[1] > MAX_EPOCHS:
        raise phase_error(i, "epochs", f"at most {MAX_EPOCHS:,} epochs, got {list(ep)}")
    found = problems(p)  # the val_ keys default to the crop: checked after it
    for key, message in sorted(found, key=lambda item: item[0].startswith("val_")):
        if key.startswith("val_"):
            _check_crops(p, i)
        raise phase_error(i, key, f"{message}, got {getattr(p, key)!r}")
    _check_crops(p, i)
    if p.val_crop_size > p.val_prep_size:
        raise phase_error(
            i, "val_crop_size", f"{p.val_crop_size} > val_prep_size {p.val_prep_size}"
        )
    if p.val_resize_size is not None and p.val_resize_size < p.val_crop_size:
        raise phase_error(
            i, "val_resize_size", f"{p.val_resize_size} < val_crop_size {p.val_crop_size}"
        )
    _check_lr(p, i)


def phase_from_dict(data: Any, index: int) -> Phase:
    """One JSON phase object -> Phase; unknown or missing keys raise ScheduleError."""
    if not isinstance(data, Mapping):
        raise ScheduleError(f"phase {index}: must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(PHASE_KEYS))
    if unknown:
        raise phase_error(index, unknown[0], f"unknown key; allowed: {', '.join(PHASE_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise phase_error(index, missing[0], f"missing (required: {', '.join(REQUIRED_KEYS)})")
    return Phase(**data)


@dataclass(frozen=True)
class Schedule:
    """Validated, contiguous phases covering epochs [0, num_epochs)."""

    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        phases = tuple(self.phases)
        object.__setattr__(self, "phases", phases)
        if not phases:
            raise ScheduleError("schedule has no phases")
        expected = 0
        for i, p in enumerate(phases):
            if not isinstance(p, Phase):
                raise ScheduleError(f"phase {i}: must be a Phase, got {type(p).__name__}")
            check_phase(p, i)
            start, end = p.epochs
            if start > expected:
                raise phase_error(
                    i, "epochs", f"gap: epochs [{expected}, {start}) belong to no phase"
                )
            if start < expected:
                raise phase_error(
                    i,
                    "epochs",
                    f"overlap: starts at {start} but epochs "
                    f"before {expected} are taken by phase {i - 1}",
                )
            expected = end

    @classmethod
    def from_dicts(cls, items: Sequence[Any]) -> Schedule:
        if not isinstance(items, (list, tuple)):
            raise ScheduleError(f"phases must be a list, got {type(items).__name__}")
        return cls(tuple(phase_from_dict(item, i) for i, item in enumerate(items)))

    def to_dicts(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.phases]

    @property
    def num_epochs(self) -> int:
        return self.phases[-1].epochs[1]

    def phase_index_at(self, epoch: int) -> int:
        if not is_int(epoch) or not 0 <= epoch < self.num_epochs:
            raise ScheduleError(f"epoch {epoch!r} is outside the schedule [0, {self.num_epochs})")
        starts = [p.epochs[0] for p in self.phases]
        return bisect.bisect_right(starts, epoch) - 1

    def phase_at(self, epoch: int) -> Phase:
        return self.phases[self.phase_index_at(epoch)]

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """LR for 0-based optimizer `step` of `epoch`, as the phase's lr_shape says."""
        if not is_int(steps_per_epoch) or steps_per_epoch < 1:
            raise ScheduleError(
                f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}"
            )
        if not is_int(step) or not 0 <= step < steps_per_epoch:
            raise ScheduleError(f"step {step!r} is outside [0, {steps_per_epoch})")
        return self.phase_at(epoch).lr_at(epoch, step, steps_per_epoch)

"""Training schedule: phases.json -> `Phase` / `Schedule`, answered by pure queries.

Stdlib only: no torch, no typer, nothing runs at import time.

Our format (docs: GUIDE.md section 4) is a JSON list of phases, or an object
`{"phases": [...], "recipe": {...}, "note": "..."}`.  A phase is a half-open epoch range
`[start, end)` and what it trains on:

    {"epochs": [0, 13], "prep_size": 160, "crop_size": 128, "batch_size": 512,
     "lr": [1.0, 2.0], "min_scale": 0.08, "rect_val": false}

- `prep_size`: shorter side of the stored shards the phase reads (`train-{prep_size}/`).
- `crop_size`: side of the training input; it may not exceed `prep_size`.
- `batch_size`: PER GPU.  The global batch is `batch_size * world_size`.
- `lr`: the optimizer LR, applied to the gradient DDP averages over the global batch (the
  meaning it has in imagenet18 and FFCV).  `[start, end]` is linear per step across the whole
  phase: `start` at the phase's first step, approaching `end` at its last (FFCV's
  convention, so consecutive phases join without a jump).  A scalar is constant.  An LR is
  tuned for one world size; each recipe says which (`recipe.tuned_num_gpus`).
- `min_scale`: lower area bound of RandomResizedCrop; default 0.08, the value of
  torchvision, imagenet18 and FFCV alike.
- `rect_val`: imagenet18's aspect-ratio-batched validation; default false.
- `val_prep_size` / `val_crop_size`: validation shards and input side; default to
  `prep_size` / `crop_size` (imagenet18 validated each phase at its training size).
- `recipe` (optional) is free-form trainer settings (arch, weight_decay, ...) returned
  alongside the schedule and not validated here; `note` (optional) says where it comes from.

imagenet18's original phase lists (keys `ep`, `sz`, `bs`, `lr`, `trndir`, ...) are accepted
too and translated; see `train.imagenet18.from_imagenet18`.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from formats.layout import split_dir_name

DEFAULT_MIN_SCALE = 0.08

# What each loader is built from.  A change in these rebuilds the loader (new shards, new
# batch sampler); a change in IN_PLACE_FIELDS is applied to the live loader's transforms.
# Validation batches are sized from batch_size, and rect_val needs a different sampler.
TRAIN_LOADER_FIELDS = ("prep_size", "batch_size")
VAL_LOADER_FIELDS = ("val_prep_size", "rect_val", "batch_size")
IN_PLACE_FIELDS = ("crop_size", "min_scale", "val_crop_size")


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message is one line naming the phase and key."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Phase:
    """One contiguous run of epochs; field names equal the JSON keys.

    JSON lists become tuples, a scalar `lr` becomes `(lr, lr)`, and the `val_*` defaults are
    resolved, so two phases that train the same compare equal.  Values are checked by
    `Schedule`, which knows the phase's index for the message.
    """

    epochs: tuple[int, int]
    prep_size: int
    crop_size: int
    batch_size: int
    lr: tuple[float, float]
    min_scale: float = DEFAULT_MIN_SCALE
    rect_val: bool = False
    val_prep_size: int | None = None  # None -> prep_size
    val_crop_size: int | None = None  # None -> crop_size

    def __post_init__(self) -> None:
        put = object.__setattr__
        if isinstance(self.epochs, list):
            put(self, "epochs", tuple(self.epochs))
        if _is_number(self.lr):
            put(self, "lr", (float(self.lr), float(self.lr)))
        elif isinstance(self.lr, (list, tuple)):
            put(self, "lr", tuple(float(x) if _is_number(x) else x for x in self.lr))
        if _is_int(self.min_scale):
            put(self, "min_scale", float(self.min_scale))
        if self.val_prep_size is None:
            put(self, "val_prep_size", self.prep_size)
        if self.val_crop_size is None:
            put(self, "val_crop_size", self.crop_size)

    @property
    def train_dir_name(self) -> str:
        return split_dir_name("train", self.prep_size)

    @property
    def val_dir_name(self) -> str:
        return split_dir_name("val", self.val_prep_size)

    def lr_at_fraction(self, progress: float) -> float:
        """LR at `progress` in [0, 1] of the way through this phase (0 = its first step)."""
        start, end = self.lr
        return end if progress == 1 else start + (end - start) * progress

    def to_dict(self) -> dict[str, Any]:
        """Our JSON form, every key explicit (what a run saves as its resolved schedule)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["epochs"] = list(self.epochs)
        out["lr"] = list(self.lr)
        return out


PHASE_KEYS = tuple(f.name for f in fields(Phase))
REQUIRED_KEYS = ("epochs", "prep_size", "crop_size", "batch_size", "lr")


def _phase_error(index: int, key: str, message: str) -> ScheduleError:
    return ScheduleError(f"phase {index}, key {key!r}: {message}")


def _check_phase(p: Phase, i: int) -> None:
    ep = p.epochs
    if not (isinstance(ep, tuple) and len(ep) == 2 and all(_is_int(x) for x in ep)):
        raise _phase_error(i, "epochs", f"must be [start, end] integers, got {ep!r}")
    if ep[0] < 0 or ep[0] >= ep[1]:
        raise _phase_error(i, "epochs", f"needs 0 <= start < end (half-open), got {list(ep)}")
    for key in ("prep_size", "crop_size", "batch_size", "val_prep_size", "val_crop_size"):
        value = getattr(p, key)
        if not _is_int(value) or value <= 0:
            raise _phase_error(i, key, f"must be a positive integer, got {value!r}")
    if p.crop_size > p.prep_size:
        raise _phase_error(i, "crop_size", f"{p.crop_size} > prep_size {p.prep_size}; "
                           "read larger shards (raise prep_size) or crop smaller")
    if p.val_crop_size > p.val_prep_size:
        raise _phase_error(i, "val_crop_size", f"{p.val_crop_size} > val_prep_size "
                           f"{p.val_prep_size}")
    lr = p.lr
    if not (isinstance(lr, tuple) and len(lr) == 2 and all(_is_number(x) for x in lr)):
        raise _phase_error(i, "lr", f"must be a number or [start, end], got {lr!r}")
    if not all(math.isfinite(x) and x >= 0 for x in lr):
        raise _phase_error(i, "lr", f"must be finite and >= 0, got {list(lr)}")
    if not (_is_number(p.min_scale) and 0 < p.min_scale <= 1):
        raise _phase_error(i, "min_scale", f"must be in (0, 1], got {p.min_scale!r}")
    if not isinstance(p.rect_val, bool):
        raise _phase_error(i, "rect_val", f"must be true or false, got {p.rect_val!r}")


def phase_from_dict(data: Any, index: int) -> Phase:
    """One JSON phase object -> Phase; unknown or missing keys raise ScheduleError."""
    if not isinstance(data, Mapping):
        raise ScheduleError(f"phase {index}: must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(PHASE_KEYS))
    if unknown:
        raise _phase_error(index, unknown[0], f"unknown key; allowed: {', '.join(PHASE_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise _phase_error(index, missing[0], "missing (required: "
                           f"{', '.join(REQUIRED_KEYS)})")
    return Phase(**data)


@dataclass(frozen=True)
class LoaderChanges:
    """What differs at `epoch` from the epoch before, and what the trainer must do about it."""

    epoch: int
    changed: tuple[str, ...]  # Phase field names, in field order; all of them when fresh
    fresh: bool = False

    @property
    def rebuild_train(self) -> bool:
        return any(k in self.changed for k in TRAIN_LOADER_FIELDS)

    @property
    def rebuild_val(self) -> bool:
        return any(k in self.changed for k in VAL_LOADER_FIELDS)

    @property
    def in_place(self) -> tuple[str, ...]:
        """Fields to set on a live (not rebuilt) loader: crop_size, min_scale, val_crop_size."""
        kept = {"crop_size": not self.rebuild_train, "min_scale": not self.rebuild_train,
                "val_crop_size": not self.rebuild_val}
        return tuple(k for k in self.changed if kept.get(k, False))

    def describe(self) -> str:
        if self.fresh:
            return "build train+val"
        rebuilt = [name for name, flag in (("train", self.rebuild_train),
                                           ("val", self.rebuild_val)) if flag]
        parts = [f"rebuild {'+'.join(rebuilt)}"] if rebuilt else []
        if self.in_place:
            parts.append(f"in place: {', '.join(self.in_place)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class EpochRow:
    """One row of `Schedule.table()`: what epoch `epoch` trains on and how."""

    epoch: int
    phase_index: int
    train_dir_name: str
    prep_size: int
    crop_size: int
    min_scale: float
    batch_size: int
    lr_start: float  # at the epoch's first step
    lr_end: float  # approached at its last step
    val_dir_name: str
    val_crop_size: int
    rect_val: bool
    loaders: str  # LoaderChanges.describe() for this epoch


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
            _check_phase(p, i)
            start, end = p.epochs
            if start > expected:
                raise _phase_error(i, "epochs", f"gap: epochs [{expected}, {start}) belong to "
                                   "no phase")
            if start < expected:
                raise _phase_error(i, "epochs", f"overlap: starts at {start} but epochs "
                                   f"before {expected} are taken by phase {i - 1}")
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
        if not _is_int(epoch) or not 0 <= epoch < self.num_epochs:
            raise ScheduleError(f"epoch {epoch!r} is outside the schedule [0, {self.num_epochs})")
        starts = [p.epochs[0] for p in self.phases]
        return bisect.bisect_right(starts, epoch) - 1

    def phase_at(self, epoch: int) -> Phase:
        return self.phases[self.phase_index_at(epoch)]

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """LR for 0-based `step` of `epoch`: linear over all the steps of the phase."""
        if not _is_int(steps_per_epoch) or steps_per_epoch < 1:
            raise ScheduleError(f"steps_per_epoch must be a positive integer, got "
                                f"{steps_per_epoch!r}")
        if not _is_int(step) or not 0 <= step < steps_per_epoch:
            raise ScheduleError(f"step {step!r} is outside [0, {steps_per_epoch})")
        p = self.phase_at(epoch)
        start, end = p.epochs
        done = (epoch - start) * steps_per_epoch + step
        return p.lr_at_fraction(done / ((end - start) * steps_per_epoch))

    def loader_changes(self, epoch: int, *, fresh: bool = False) -> LoaderChanges:
        """What changed at `epoch` since `epoch - 1`.

        `fresh=True` (or epoch 0) means the process holds no loaders yet, as after a resume:
        everything counts as changed, so both loaders are built.
        """
        now = self.phase_at(epoch)
        if fresh or epoch == 0:
            return LoaderChanges(epoch, PHASE_KEYS, fresh=True)
        before = self.phase_at(epoch - 1)
        changed = tuple(k for k in PHASE_KEYS
                        if k not in ("epochs", "lr") and getattr(now, k) != getattr(before, k))
        return LoaderChanges(epoch, changed)

    def table(self) -> list[EpochRow]:
        """One row per epoch, for `train run --dry-run` and the saved run config."""
        rows = []
        for epoch in range(self.num_epochs):
            i = self.phase_index_at(epoch)
            p = self.phases[i]
            start, end = p.epochs
            length = end - start
            rows.append(EpochRow(
                epoch=epoch, phase_index=i, train_dir_name=p.train_dir_name,
                prep_size=p.prep_size, crop_size=p.crop_size, min_scale=p.min_scale,
                batch_size=p.batch_size,
                lr_start=p.lr_at_fraction((epoch - start) / length),
                lr_end=p.lr_at_fraction((epoch + 1 - start) / length),
                val_dir_name=p.val_dir_name, val_crop_size=p.val_crop_size,
                rect_val=p.rect_val, loaders=self.loader_changes(epoch).describe()))
        return rows


def _format_lr(start: float, end: float) -> str:
    return f"{start:.4g}" if start == end else f"{start:.4g} -> {end:.4g}"


def format_table(rows: Sequence[EpochRow]) -> str:
    """Render `Schedule.table()` as aligned text (batch is per GPU)."""
    header = ("epoch", "phase", "train_dir", "crop", "min_scale", "batch/gpu", "lr",
              "val_dir", "val_crop", "rect_val", "loaders")
    body = [(str(r.epoch), str(r.phase_index), r.train_dir_name, str(r.crop_size),
             f"{r.min_scale:g}", str(r.batch_size), _format_lr(r.lr_start, r.lr_end),
             r.val_dir_name, str(r.val_crop_size), "yes" if r.rect_val else "no", r.loaders)
            for r in rows]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
    text_columns = {2, 6, 7, 10}
    lines = []
    for row in [header, *body]:
        cells = [cell.ljust(w) if c in text_columns else cell.rjust(w)
                 for c, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --- files ------------------------------------------------------------------------------

TOP_LEVEL_KEYS = ("phases", "recipe", "note")


@dataclass(frozen=True)
class LoadedSchedule:
    """A schedule file: the validated schedule plus its free-form trainer settings."""

    schedule: Schedule
    recipe: Mapping[str, Any]  # not validated here: the trainer checks what it reads
    note: str | None
    source_format: str  # "shardtrain" or "imagenet18"


def parse_schedule(data: Any, *, full_prep_size: int | None = None) -> LoadedSchedule:
    """Decoded JSON (a list of phases, or {"phases": [...], "recipe", "note"}) -> schedule.

    The format is detected from the phases: `ep`/`sz` keys mean imagenet18's.
    """
    recipe: Mapping[str, Any] = {}
    note = None
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise ScheduleError(f"top-level key {unknown[0]!r}: unknown; allowed: "
                                f"{', '.join(TOP_LEVEL_KEYS)}")
        if "phases" not in data:
            raise ScheduleError("top-level key 'phases': missing")
        recipe = data.get("recipe", {})
        if not isinstance(recipe, Mapping):
            raise ScheduleError(f"top-level key 'recipe': must be an object, got "
                                f"{type(recipe).__name__}")
        note = data.get("note")
        if note is not None and not isinstance(note, str):
            raise ScheduleError("top-level key 'note': must be a string")
        data = data["phases"]
    if not isinstance(data, list) or not data:
        raise ScheduleError("phases must be a non-empty list")
    keys = set().union(*(entry for entry in data if isinstance(entry, Mapping)))
    if keys & {"ep", "sz"}:
        # Imported here: train.imagenet18 builds on this module's Phase and Schedule.
        from train.imagenet18 import from_imagenet18

        if "epochs" in keys:
            raise ScheduleError("phases mix our keys ('epochs') with imagenet18's ('ep', 'sz')")
        return LoadedSchedule(from_imagenet18(data, full_prep_size=full_prep_size),
                              dict(recipe), note, "imagenet18")
    return LoadedSchedule(Schedule.from_dicts(data), dict(recipe), note, "shardtrain")


def load_schedule(path: str | Path, *, full_prep_size: int | None = None) -> LoadedSchedule:
    """Read a phases JSON file; every failure is a one-line ScheduleError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScheduleError(f"{path}: no such schedule file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScheduleError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScheduleError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                            f"{exc.msg}") from None
    try:
        return parse_schedule(data, full_prep_size=full_prep_size)
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None

"""imagenet18's original phase lists (diux-dev/imagenet18), translated to our `Schedule`."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from train.errors import ScheduleError
from train.plan.schedule import DEFAULT_MIN_SCALE, Phase, Schedule
from train.plan.settings import is_int, is_number

IMAGENET18_KEYS = ("ep", "sz", "bs", "lr", "trndir", "valdir", "min_scale", "rect_val", "keep_dl")
_IMAGENET18_DATA_KEYS = ("sz", "trndir", "valdir", "min_scale", "rect_val", "keep_dl")
_SZ_DIR = re.compile(r"-sz/(\d+)")


def _entry_error(index: int, key: str, message: str) -> ScheduleError:
    return ScheduleError(f"imagenet18 entry {index}, key {key!r}: {message}")


def _epoch_pair(value: Any, i: int) -> tuple[int, int | None]:
    if is_int(value):
        return value, None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(x) for x in value):
        if value[0] >= value[1]:
            raise _entry_error(i, "ep", f"needs start < end, got {list(value)}")
        return value[0], value[1]
    raise _entry_error(i, "ep", f"must be an epoch or [start, end], got {value!r}")


def _lr_pair(value: Any, i: int) -> tuple[float, float]:
    if is_number(value):
        return float(value), float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(is_number(x) for x in value):
        return float(value[0]), float(value[1])
    raise _entry_error(i, "lr", f"must be a number or [start, end], got {value!r}")


def from_imagenet18(entries: Sequence[Any], *, full_prep_size: int | None = None) -> Schedule:
    """Translate an imagenet18 phase list (diux-dev/imagenet18 train.py) into a Schedule."""
    data, lrs = _read_entries(entries)
    num_epochs = _check_lr_phases(data, lrs)
    if full_prep_size is not None and (not is_int(full_prep_size) or full_prep_size <= 0):
        raise ScheduleError(f"full_prep_size must be a positive integer, got {full_prep_size!r}")
    if full_prep_size is None:
        sized = [
            int(m.group(1))
            for _, d in data
            for key in ("trndir", "valdir")
            if (m := _SZ_DIR.fullmatch(d[key]))
        ]
        full_prep_size = max(sized) if sized else None
    bounds = sorted({s for s, _ in data} | {s for s, _, _ in lrs} | {num_epochs})
    bounds = [b for b in bounds if b <= num_epochs]
    phases = []
    for lo, hi in zip(bounds, bounds[1:]):
        d = next(d for s, d in reversed(data) if s <= lo)
        lr_phase = next(seg for seg in reversed(lrs) if seg[0] <= lo)
        phases.append(
            Phase(
                epochs=(lo, hi),
                prep_size=_prep_size_of(d["trndir"], full_prep_size, d["index"], "trndir", d["sz"]),
                crop_size=d["sz"],
                batch_size=d["bs"],
                lr=(_lr_of(lr_phase, lo), _lr_of(lr_phase, hi)),
                min_scale=d["min_scale"],
                rect_val=d["rect_val"],
                val_prep_size=_prep_size_of(
                    d["valdir"], full_prep_size, d["index"], "valdir", d["sz"]
                ),
                val_crop_size=d["sz"],
            )
        )
    return Schedule(tuple(phases))


DataPhases = list[tuple[int, dict[str, Any]]]  # (start epoch, settings)
LRPhases = list[tuple[int, int | None, tuple[float, float]]]  # (start, end or None, lr pair)


def _read_entries(entries: Sequence[Any]) -> tuple[DataPhases, LRPhases]:
    """Each entry checked and sorted into data phases and LR phases."""
    if not isinstance(entries, list) or not entries:
        raise ScheduleError("imagenet18 phases must be a non-empty list")
    data: DataPhases = []
    lrs: LRPhases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ScheduleError(f"imagenet18 entry {i}: must be an object")
        unknown = sorted(set(entry) - set(IMAGENET18_KEYS))
        if unknown:
            raise _entry_error(i, unknown[0], f"unknown key; allowed: {', '.join(IMAGENET18_KEYS)}")
        if "ep" not in entry:
            raise _entry_error(i, "ep", "missing")
        start, end = _epoch_pair(entry["ep"], i)
        if "bs" not in entry and "lr" not in entry:
            raise _entry_error(i, "bs", "missing: an entry needs 'bs' (data) or 'lr' (LR)")
        if "bs" in entry:
            if end is not None:
                raise _entry_error(i, "ep", "a data phase starts at one epoch, not a range")
            if data and start <= data[-1][0]:
                raise _entry_error(
                    i,
                    "ep",
                    f"data phases must start in increasing order ({start} after {data[-1][0]})",
                )
            data.append((start, _data_settings(entry, i, data)))
        else:
            stray = [k for k in _IMAGENET18_DATA_KEYS if k in entry]
            if stray:
                raise _entry_error(i, stray[0], "data settings need 'bs' in the same entry")
        if "lr" in entry:
            lr = _lr_pair(entry["lr"], i)
            if end is None and lr[0] != lr[1]:
                raise _entry_error(i, "ep", "a linear lr [start, end] needs ep [start, end]")
            if lrs and start <= lrs[-1][0]:
                raise _entry_error(
                    i,
                    "ep",
                    f"LR phases must start in increasing order ({start} after {lrs[-1][0]})",
                )
            lrs.append((start, end, lr))
    return data, lrs


def _check_lr_phases(data: DataPhases, lrs: LRPhases) -> int:
    """Both kinds start at epoch 0 and the LR phases leave no gap; returns the epoch count."""
    if not data or data[0][0] != 0:
        raise ScheduleError("imagenet18 list: no data phase ('bs') at epoch 0")
    if not lrs or lrs[0][0] != 0:
        raise ScheduleError("imagenet18 list: no LR phase ('lr') at epoch 0")
    num_epochs = max(e if e is not None else s for s, e, _ in lrs)
    if lrs[-1][0] >= num_epochs:
        raise ScheduleError("imagenet18 list: the last LR phase needs ep [start, end]")
    for k, (s, e, (lr0, lr1)) in enumerate(lrs[:-1]):
        if e is not None and lrs[k + 1][0] > e and lr0 != lr1:
            raise ScheduleError(
                f"imagenet18 list: linear LR phase {[s, e]} ends before the "
                f"next LR phase starts at {lrs[k + 1][0]} (gap)"
            )
    return num_epochs


def _lr_of(lr_phase: tuple[int, int | None, tuple[float, float]], epoch: int) -> float:
    """imagenet18's LR at a (phase boundary) epoch: constant, or linear over ep [s, e]."""
    s, e, (lr0, lr1) = lr_phase
    if e is None or lr0 == lr1 or epoch == s:
        return lr0
    return lr1 if epoch == e else lr0 + (lr1 - lr0) * (epoch - s) / (e - s)


def _data_settings(
    entry: Mapping[str, Any], i: int, data: list[tuple[int, dict[str, Any]]]
) -> dict[str, Any]:
    for key, check, what in (
        ("bs", is_int, "an integer"),
        ("sz", is_int, "an integer"),
        ("trndir", lambda v: isinstance(v, str), "a string"),
        ("valdir", lambda v: isinstance(v, str), "a string"),
        ("min_scale", is_number, "a number"),
        ("rect_val", lambda v: isinstance(v, bool), "true or false"),
        ("keep_dl", lambda v: isinstance(v, bool), "true or false"),
    ):
        if key in entry and not check(entry[key]):
            raise _entry_error(i, key, f"must be {what}, got {entry[key]!r}")
    if entry.get("keep_dl", False):
        if not data:
            raise _entry_error(i, "keep_dl", "needs an earlier data phase to keep")
        settings = dict(data[-1][1])
        for key in ("sz", "trndir", "valdir", "min_scale", "rect_val"):
            if key in entry and entry[key] != settings[key]:
                raise _entry_error(
                    i,
                    key,
                    f"keep_dl keeps the loader, so {key} stays "
                    f"{settings[key]!r}; drop keep_dl to change it",
                )
        settings.update(bs=entry["bs"], index=i)
        return settings
    if "sz" not in entry:
        raise _entry_error(i, "sz", "missing (a data phase without keep_dl needs 'sz')")
    trndir = entry.get("trndir", "")
    return {
        "sz": entry["sz"],
        "bs": entry["bs"],
        "trndir": trndir,
        "valdir": entry.get("valdir", trndir),
        "min_scale": float(entry.get("min_scale", DEFAULT_MIN_SCALE)),
        "rect_val": entry.get("rect_val", False),
        "index": i,
    }


def _prep_size_of(directory: str, full_prep_size: int | None, i: int, key: str, sz: int) -> int:
    if directory == "":
        if full_prep_size is None:
            raise _entry_error(
                i,
                key,
                "'' means full-size images; pass full_prep_size "
                "(no '-sz/N' directory in the list to default to)",
            )
        if full_prep_size < sz:
            raise _entry_error(
                i,
                key,
                f"'' means full-size images, here prep_size "
                f"{full_prep_size} < sz {sz}; pass a larger full_prep_size",
            )
        return full_prep_size
    match = _SZ_DIR.fullmatch(directory)
    if not match:
        raise _entry_error(
            i, key, f"expected '-sz/<prep_size>' or '' (full size), got {directory!r}"
        )
    return int(match.group(1))

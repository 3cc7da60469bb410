"""phases.json files: read one, tell our format from imagenet18's, return the schedule."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from train.errors import ScheduleError
from train.plan.imagenet18 import from_imagenet18
from train.plan.schedule import Schedule

TOP_LEVEL_KEYS = ("phases", "recipe", "note")


@dataclass(frozen=True)
class LoadedSchedule:
    """A schedule file: the validated schedule plus its free-form trainer settings."""

    schedule: Schedule
    recipe: Mapping[str, Any]  # not validated here: train.plan.config.Recipe checks it
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
            raise ScheduleError(
                f"top-level key {unknown[0]!r}: unknown; allowed: {', '.join(TOP_LEVEL_KEYS)}"
            )
        if "phases" not in data:
            raise ScheduleError("top-level key 'phases': missing")
        recipe = data.get("recipe", {})
        if not isinstance(recipe, Mapping):
            raise ScheduleError(
                f"top-level key 'recipe': must be an object, got {type(recipe).__name__}"
            )
        note = data.get("note")
        if note is not None and not isinstance(note, str):
            raise ScheduleError("top-level key 'note': must be a string")
        data = data["phases"]
    if not isinstance(data, list) or not data:
        raise ScheduleError("phases must be a non-empty list")
    keys = set().union(*(entry for entry in data if isinstance(entry, Mapping)))
    if keys & {"ep", "sz"}:
        if "epochs" in keys:
            raise ScheduleError("phases mix our keys ('epochs') with imagenet18's ('ep', 'sz')")
        return LoadedSchedule(
            from_imagenet18(data, full_prep_size=full_prep_size), dict(recipe), note, "imagenet18"
        )
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
        raise ScheduleError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    try:
        return parse_schedule(data, full_prep_size=full_prep_size)
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None

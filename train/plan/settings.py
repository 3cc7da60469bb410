"""One declaration per setting: `setting()` (default, help, allowed values) and `problem()`, the
check every declared field gets; cli.py derives its options from the same fields."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple = (),
    low: float | None = None,
    high: float | None = None,
    bounds: str = "[]",
    flag: str | None = None,
    cli: bool = False,
) -> Any:
    """A dataclass field with its help and allowed values. `bounds` says which ends of
    [low, high] are open ("[)": high excluded); `flag` is a command-line name other than the
    field's; cli=True makes a recipe key a `train run` option too (RunConfig's all are)."""
    meta = dict(help=help, choices=choices, low=low, high=high, bounds=bounds, flag=flag, cli=cli)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def kind_of(hint: Any) -> tuple[Any, bool]:
    """(base type, None allowed) of a resolved annotation such as `int | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = args[0] if len(args) == 1 else object  # several types: the owner checks it
        return kind, len(args) < len(typing.get_args(hint))
    return typing.get_origin(hint) or hint, False


def declared(cls: type) -> list[tuple[dataclasses.Field, Any, bool]]:
    """(field, base type, None allowed) for each field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return [(f, *kind_of(hints[f.name])) for f in dataclasses.fields(cls)]


TYPE_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a path",
}


def problem(value: Any, kind: Any, nullable: bool, meta: Mapping[str, Any]) -> str | None:
    """Why `value` is not allowed for a declared setting ("must be ..."); None if it is."""
    if value is None:
        return None if nullable else "must be set"
    ok = {
        bool: lambda: isinstance(value, bool),
        int: lambda: is_int(value),
        float: lambda: is_number(value) and math.isfinite(value),
        str: lambda: isinstance(value, str),
        Path: lambda: isinstance(value, (str, Path)),
        Mapping: lambda: isinstance(value, Mapping),
    }.get(kind, lambda: True)
    positive = kind is int and meta.get("low") == 1 and meta.get("high") is None
    if not ok():
        return (
            "must be a positive integer"
            if positive
            else f"must be {TYPE_WORDS.get(kind, 'an object')}"
        )
    choices = meta.get("choices")
    if choices and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}" + (" or null" if nullable else "")
    low, high, bounds = meta.get("low"), meta.get("high"), meta.get("bounds", "[]")
    below = low is not None and (value <= low if bounds[0] == "(" else value < low)
    above = high is not None and (value >= high if bounds[1] == ")" else value > high)
    if kind is int and (below or above):
        return (
            "must be a positive integer"
            if positive
            else f"must be >= {low}"
            if below
            else f"must be <= {high}"
        )
    if below or above:
        low, high = -math.inf if low is None else low, math.inf if high is None else high
        return f"must be a number in {bounds[0]}{low:g}, {high:g}{bounds[1]}"
    return None


def problems(obj: Any) -> list[tuple[str, str]]:
    """(field name, problem) for each declared field of dataclass `obj` that is not allowed."""
    found = []
    for f, kind, nullable in declared(type(obj)):
        if "help" in f.metadata:
            message = problem(getattr(obj, f.name), kind, nullable, f.metadata)
            if message:
                found.append((f.name, message))
    return found

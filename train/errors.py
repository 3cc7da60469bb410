"""Every error the trainer reports, under one base class; `train` prints each as one line."""

from __future__ import annotations

from formats import DatasetError


class TrainError(Exception):
    """A run that cannot start or go on; the message is one line for `train: error: ...`."""


class Interrupted(TrainError):
    """SIGINT/SIGTERM: a checkpoint was saved; `--resume auto` continues from it."""


class RecipeError(TrainError):
    """A setting (recipe key or option) the trainer cannot use; the message names it."""


class ScheduleError(TrainError):
    """A schedule that cannot be used; the message names the phase and key."""


class CheckpointError(TrainError):
    """A checkpoint or run directory that cannot be resumed, written or cleared."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` of a library's exception on one line (whitespace collapsed, cut)."""
    text = " ".join(str(exc).split())[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# What the command line turns into one line: ours, and the shards' own (formats, shared with prep).
REPORTED = (TrainError, DatasetError)

"""What the launcher (torchrun) says before any process group, and rank-0-only output; no torch."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

from train.errors import TrainError

T = TypeVar("T")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise TrainError(f"environment variable {name}={value!r} is not an integer") from None


def launch_world_size() -> int:
    """WORLD_SIZE as the launcher set it (1 without one): known before any process group."""
    return max(env_int("WORLD_SIZE", 1), 1)


def processes_per_node() -> int:
    """How many ranks share this machine's cores (torchrun's LOCAL_WORLD_SIZE; 1 without)."""
    return max(env_int("LOCAL_WORLD_SIZE", 1), 1)


def is_main_process() -> bool:
    """Rank 0 of the process group, or of the launcher's environment before one exists."""
    torch_dist = sys.modules.get("torch.distributed")  # no torch imported: no process group
    if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: the call happens on rank 0 only; other ranks get None."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


@rank_zero_only
def say(text: str) -> None:
    """One line on stderr from rank 0, above any progress bar."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)

"""SIGINT/SIGTERM during `train run`: checkpoint at the next safe point, then exit 130."""

from __future__ import annotations

import signal
import time
from typing import Any

from train.engine.launch import say


class StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint and a clean exit at the next safe point."""

    DUPLICATE_S = 2.0

    def __init__(self) -> None:
        self.requested = False
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > self.DUPLICATE_S:
                raise KeyboardInterrupt
            return
        self.requested, self._first_at = True, time.monotonic()
        say(
            f"{signal.Signals(signum).name}: checkpointing at the next safe point "
            "(Ctrl-C again to abort without it)"
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""A rank never outlives the launcher that started it (torchrun's agent, say).

torchrun stops its ranks when one fails, but a rank whose agent is killed (kill -9, a lost
node's shell, an OOM kill) is reparented and would wait on: for the rendezvous, its build's
workers, the barrier before the merge. A daemon thread checks twice a second that the
process's parent is still the one that started it. When it is gone it sends this process
SIGTERM, so Python code unwinds as for Ctrl-C (a build commits what it has, a merge stays
resumable); a main thread blocked in C (a gloo barrier, a TCPStore connect) never sees that
signal, so after a few seconds the thread prints the caller's one line and ends the process
(forked workers die with it: prep.workers; the kernel drops its flock locks; partial output is
kill -9 safe by design).

Self-contained on purpose (standard library only, no imports of ours): train can copy or share
the same watch around its own rendezvous and loop.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

POLL_SECONDS = 0.5
# Time the main thread gets to unwind after SIGTERM before the process is ended outright.
GRACE_SECONDS = 5.0


class ParentWatch:
    """`start()` once; `lost` says whether the parent went away (the reason for a SIGTERM)."""

    def __init__(
        self,
        exit_line: str,
        poll_seconds: float = POLL_SECONDS,
        grace_seconds: float = GRACE_SECONDS,
    ):
        self.exit_line = exit_line  # printed to stderr when the process has to be ended outright
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.parent_pid = os.getppid()
        self.lost = threading.Event()

    def start(self) -> "ParentWatch":
        threading.Thread(target=self._watch, name="parent-watch", daemon=True).start()
        return self

    def parent_gone(self, wait_seconds: float = 0.0) -> bool:
        """Whether the parent is gone, checked for up to `wait_seconds`: an error from a peer
        connection may arrive just before the kernel reparents this process."""
        deadline = time.monotonic() + wait_seconds
        while True:
            # Parent 1: orphaned before the watch began (the launcher died during our imports).
            if os.getppid() != self.parent_pid or self.parent_pid == 1:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self.parent_gone():
            time.sleep(self.poll_seconds)
        self.lost.set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.grace_seconds)
        sys.stderr.write(self.exit_line + "\n")
        sys.stderr.flush()
        os._exit(1)

"""Worker processes that never outlive prep, however prep ends.

A worker blocked on its task pipe does not notice its parent's death (its siblings hold the
pipe's other end open), so each one asks the kernel for SIGKILL when the parent dies
(PR_SET_PDEATHSIG, Linux) and also checks, once a second, that its parent is still the one
that started it (any POSIX system). Workers ignore SIGINT and SIGTERM: the main process handles
both and shuts the pool down, so no task dies halfway and the build stays resumable.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from typing import Callable

from prep.lock import close_inherited_locks

PR_SET_PDEATHSIG = 1
PARENT_CHECK_SECONDS = 1.0


def _ask_for_sigkill_on_parent_death() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the liveness thread below still works
        pass


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(PARENT_CHECK_SECONDS)


def _start_worker(parent_pid: int, initializer: Callable | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    close_inherited_locks()
    _ask_for_sigkill_on_parent_death()
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def process_pool(
    num_workers: int, initializer: Callable | None = None, initargs: tuple = ()
) -> concurrent.futures.ProcessPoolExecutor:
    """A forked pool whose workers die with this process. Fork, because workers inherit what
    the parent loaded (the record table, the codecs) without pickling it."""
    return concurrent.futures.ProcessPoolExecutor(
        num_workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )

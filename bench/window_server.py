"""A loader behind a pipe, timed in windows on command: what lets bench/loader_peers.py measure
loaders that live in other interpreters (FFCV and DALI in their own venv, ours and the
prototype in the project's) in interleaved rounds, each in its own process.

Protocol (JSON lines): the server prints {"ready": {...facts}} once its loader has produced its
first batches, then answers each command line on stdin with one result line:
  {"batches": N, "warmup": K}  -> K batches untimed (flushes what was prefetched while idle),
                                 then N timed batches
  {"seconds": S, "warmup": K}  -> as above, whole rounds of `step` batches until >= S seconds
  {"quit": true}               -> exits
Only stdlib, psutil and numpy-free code here: both venvs import this file.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import psutil


def tree_cpu_seconds(process: psutil.Process) -> float:
    """CPU time of a process and all its live children (worker processes, if any)."""
    total = 0.0
    for member in [process] + process.children(recursive=True):
        try:
            times = member.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_memory_mb(process: psutil.Process) -> dict:
    """RSS of the whole tree and the largest private (USS) share of one member, in MiB."""
    rss, uss = 0, []
    for member in [process] + process.children(recursive=True):
        try:
            info = member.memory_full_info()
            rss += info.rss
            uss.append(info.uss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return {"rss_mb": rss / 2**20, "max_uss_mb": max(uss, default=0) / 2**20, "processes": len(uss)}


def describe_batch(images) -> dict:
    """Layout facts of a batch (a torch tensor): what the caller gets, checked by the driver."""
    facts = {"shape": list(images.shape), "dtype": str(images.dtype)}
    if hasattr(images, "is_contiguous"):
        import torch

        facts["contiguous"] = bool(images.is_contiguous())
        facts["channels_last"] = bool(images.is_contiguous(memory_format=torch.channels_last))
    return facts


def timed(batches, command: dict, step: int) -> dict:
    process = psutil.Process()
    for _ in range(int(command.get("warmup", 0))):
        next(batches)
    cpu_started, started, images, count = tree_cpu_seconds(process), time.perf_counter(), 0, 0
    want, seconds = command.get("batches"), command.get("seconds")
    while True:
        batch = next(batches)
        images += len(batch[0])
        count += 1
        if want is not None and count >= want:
            break
        if (
            seconds is not None
            and count % step == 0
            and count >= 2 * step
            and time.perf_counter() - started >= seconds
        ):
            break
    wall = time.perf_counter() - started
    return {
        "images": images,
        "seconds": wall,
        "batches": count,
        "cpu_seconds": tree_cpu_seconds(process) - cpu_started,
    } | tree_memory_mb(process)


def serve(make_batches, facts: dict, warmup_batches: int, step: int = 1) -> int:
    """Run the protocol over `make_batches()` (an endless iterator of (images, labels)).

    A failure while building or running the loader becomes {"error": "..."} and exit 1, so the
    driver prints one line instead of a traceback from another interpreter."""
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the protocol
    try:
        batches = make_batches()
        first = next(batches)
        for _ in range(max(0, warmup_batches - 1)):
            next(batches)
        print(json.dumps({"ready": facts | describe_batch(first[0])}), file=out, flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            if command.get("quit"):
                break
            print(json.dumps(timed(batches, command, step)), file=out, flush=True)
    except Exception as err:  # reported as data: the driver lives in another interpreter
        traceback.print_exc(file=sys.stderr)
        print(
            json.dumps({"error": f"{type(err).__name__}: {err}".splitlines()[0]}),
            file=out,
            flush=True,
        )
        return 1
    return 0

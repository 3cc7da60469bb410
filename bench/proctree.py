"""Watching a benchmarked command's whole process tree (main process, workers, torchrun ranks):
memory it holds, files it has open, its main process's CPU time, sampled from a thread."""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path
from typing import Callable

import psutil


def anon_rss_kib(pid: int) -> int:
    """RssAnon: memory the process itself holds. Plain RSS also counts file pages it has mapped
    (LMDB's data file, msgpack shards read back for the manifest's digests), which are page
    cache the kernel reclaims at will and grow with the dataset without being held by the build."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every waited-for child so far (a command's whole tree, since
    prep waits for its workers): the kernel's accounting, which other load barely moves."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> dict:
    """The whole machine's CPU seconds so far (all cores): busy (anything but idle and iowait),
    iowait and steal, so a sample can tell the tree's share from everyone else's."""
    times = psutil.cpu_times()
    total = sum(times)
    return {
        "machine_busy_s": total - times.idle - getattr(times, "iowait", 0.0),
        "machine_iowait_s": getattr(times, "iowait", 0.0),
        "machine_steal_s": getattr(times, "steal", 0.0),
    }


class TreeSampler:
    """Every `interval` s: summed anonymous RSS and open file descriptors of `pid` and all its
    descendants, the root's own CPU seconds, the machine's CPU seconds, and `probe()` (e.g. a
    build's progress). Keeps the peaks, and every sample when `keep_samples`."""

    def __init__(
        self,
        pid: int,
        interval: float = 0.02,
        probe: Callable[[], object] | None = None,
        keep_samples: bool = False,
    ):
        self.process, self.interval, self.probe, self.keep_samples = (
            psutil.Process(pid),
            interval,
            probe,
            keep_samples,
        )
        self.peak_rss_kib = self.peak_fds = self.peak_processes = 0
        self.samples: list[dict] = []
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        tree = [self.process, *self.process.children(recursive=True)]
        rss = fds = 0
        for process in tree:
            try:
                rss += anon_rss_kib(process.pid)
                fds += process.num_fds()
            except (psutil.Error, OSError):  # exited between listing and reading
                pass
        self.peak_rss_kib, self.peak_fds = max(self.peak_rss_kib, rss), max(self.peak_fds, fds)
        self.peak_processes = max(self.peak_processes, len(tree))
        if self.keep_samples:
            cpu = self.process.cpu_times()
            tree_cpu = 0.0
            for process in tree:
                try:
                    times = process.cpu_times()
                    tree_cpu += times.user + times.system
                except (psutil.Error, OSError):
                    pass
            self.samples.append(
                {
                    "t": time.monotonic() - self._started,
                    "rss_mib": rss / 1024,
                    "fds": fds,
                    "processes": len(tree),
                    "main_cpu_s": cpu.user + cpu.system,
                    "main_sys_s": cpu.system,
                    "tree_cpu_s": tree_cpu,
                    "main_rss_mib": anon_rss_kib(self.process.pid) / 1024,
                    "available_mib": psutil.virtual_memory().available / 2**20,
                    **machine_cpu_seconds(),
                    "probe": self.probe() if self.probe else None,
                }
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except (psutil.Error, OSError):
                pass
            self._stop.wait(self.interval)

    def stop(self) -> "TreeSampler":
        self._stop.set()
        self._thread.join()
        return self

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / 1024

"""`train bench-loader`: loader throughput and worker memory, no model attached."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

from formats import jpeg
from train.data.augment import Augmentation
from train.data.crops import TrainCrop
from train.data.loaders import TrainLoader, ValLoader
from train.engine.launch import say
from train.errors import TrainError
from train.plan.config import WORKERS_PER_CORE, available_cpus, worker_cap

TRACE_POINTS = 8  # memory samples across the timed batches


def process_memory_mb(pid: int) -> dict[str, float]:
    """MiB from /proc/<pid>/smaps_rollup (psutil off Linux):
    "rss": every resident page, shared ones included (a forked worker's share of the parent's
    torch, and the store's mmapped pages it has touched: page cache, growing as data is read);
    "uss": pages no other process maps (still counts store pages only this process touched);
    "private_dirty": pages this process wrote and owns alone (heap, copy-on-write copies of the
    parent's objects): the number that grows if a worker copies the dataset or leaks."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            kib = {
                parts[0].rstrip(":"): int(parts[1])
                for parts in map(str.split, rollup)
                if len(parts) == 3
            }
        return {
            "rss": kib["Rss"] / 1024,
            "uss": (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024,
            "private_dirty": kib["Private_Dirty"] / 1024,
        }
    except (OSError, KeyError, ValueError):
        import psutil

        info = psutil.Process(pid).memory_full_info()
        return {"rss": info.rss / 2**20, "uss": info.uss / 2**20, "private_dirty": float("nan")}


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    usable = available_cpus()
    codecs = jpeg.codec_report()
    return (
        f"{cpu}, {usable} usable cores, load {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
        f"{codecs['pil']}; {codecs['turbojpeg']}"
    )


def capped_workers(workers: int) -> int:
    """At most worker_cap() workers, with one warning (as `train run` caps them)."""
    cap = worker_cap(available_cpus())
    if workers > cap:
        say(
            f"train: warning: --workers {workers} is more than {WORKERS_PER_CORE} per core: "
            f"using {cap}"
        )
    return min(workers, cap)


def _batches_forever(loader, prefetch: bool):
    from train.data.prefetch import DevicePrefetcher

    source = DevicePrefetcher(loader, torch.device("cpu")) if prefetch else loader
    epoch = 0
    while True:
        if isinstance(loader, TrainLoader):
            loader.set_epoch(epoch)
        yield from source
        epoch += 1


def timed_batches(
    loader, num_batches: int, warmup_batches: int, decode: str, prefetch: bool = False
):
    """(images, seconds, memory trace) of `num_batches` batches after the warm-up ones."""
    batches = _batches_forever(loader, prefetch)
    for _ in range(warmup_batches):
        next(batches)
    pids = loader.worker_pids() or [os.getpid()]  # 0 workers: the main process decodes
    trace = [(0, [process_memory_mb(pid) for pid in pids])]
    images, every = 0, max(1, num_batches // TRACE_POINTS)
    started = time.perf_counter()
    for step in range(1, num_batches + 1):
        images += len(next(batches)[0])
        if step % every == 0 or step == num_batches:
            trace.append((images, [process_memory_mb(pid) for pid in pids]))
    if decode == "gpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return images, time.perf_counter() - started, trace


def memory_fields(trace: list) -> dict:
    """Worker memory at the start and end of the timed batches, and private_dirty's trace."""
    first, last = trace[0][1], trace[-1][1]
    return {
        "worker_rss_mb": [memory["rss"] for memory in last],
        "worker_rss_start_mb": [memory["rss"] for memory in first],
        "worker_uss_mb": [memory["uss"] for memory in last],
        "worker_private_dirty_mb": [memory["private_dirty"] for memory in last],
        "worker_private_dirty_start_mb": [memory["private_dirty"] for memory in first],
        "worker_private_dirty_trace_mb": [
            (seen, [round(memory["private_dirty"], 1) for memory in sample])
            for seen, sample in trace
        ],
    }


def check_bench_augment(augment: Augmentation, val: bool, prefetch: bool) -> None:
    """The recipe's range checks (train.plan.config) plus what only the benchmark can get wrong."""
    from train.errors import RecipeError
    from train.plan.config import Recipe

    try:
        Recipe(**dataclasses.asdict(augment)).check()
    except RecipeError as exc:
        raise TrainError(f"bench-loader: {exc}") from None
    if val and augment != Augmentation():
        raise TrainError("bench-loader: augmentations apply to training batches: drop --val")


def bench_loader(
    data_dir: Path,
    crop_size: int,
    batch_size: int,
    workers: int,
    num_batches: int,
    *,
    decode: str = "cpu",
    val: bool = False,
    rect: bool = False,
    warmup_batches: int = 5,
    min_scale: float = 0.08,
    augment: Augmentation = Augmentation(),
    prefetch: bool = False,
) -> dict:
    """img/s of `num_batches` batches after `warmup_batches`, worker memory at start and end;
    `prefetch`: through train.data.prefetch on the CPU (normalised float batches; ColorJitter
    and random erasing run there)."""
    if num_batches < 1 or warmup_batches < 0:
        raise TrainError(
            f"bench-loader: need --batches >= 1 and --warmup >= 0, got {num_batches} "
            f"and {warmup_batches}"
        )
    check_bench_augment(augment, val, prefetch)
    workers = capped_workers(workers)
    try:
        if val:
            loader = ValLoader(
                data_dir, batch_size, crop_size, workers=workers, rect=rect, decode=decode
            )
        else:
            loader = TrainLoader(
                data_dir,
                batch_size,
                TrainCrop(crop_size, min_scale),
                workers=workers,
                decode=decode,
                **augment.loader_kwargs(),
            )
    except ValueError as exc:  # the loaders' argument checks: one line at the CLI, as train run's
        raise TrainError(f"bench-loader: {exc}") from None
    try:
        images, seconds, trace = timed_batches(
            loader, num_batches, warmup_batches, decode, prefetch
        )
    finally:
        loader.close()
    img_per_s = images / max(seconds, 1e-9)
    return {
        "img_per_s": img_per_s,
        "img_per_s_per_worker": img_per_s / max(workers, 1),
        "images": images,
        "seconds": seconds,
        "data_wait_seconds": seconds,  # no model: all of it is waiting for data
        "batches": num_batches,
        "batches_per_epoch": len(loader),
        **memory_fields(trace),
        "workers": workers,
        "decode": decode,
        "crop_size": crop_size,
        "batch_size": batch_size,
        "val": val,
        "rect": rect,
        "min_scale": min_scale,
        "prefetch": prefetch,
        "executor": loader.executor,
        **dataclasses.asdict(augment),
        "data_dir": str(data_dir),
        "machine": machine_description(),
    }

"""One row of bench/gpu.py: `train run`'s own step loop, timed at its own sync points.

Each measurement builds a `train.session.Session` (model, channels_last, fused SGD, autocast,
GradScaler for fp16, torch.compile, cudnn.benchmark, TF32: exactly as `train run` sets them up)
and drives `Session._run_steps`, the loop `train run` runs every epoch: per step the schedule's
LR, the step seed, `Trainer.step`, the loss summed on the device, and one host sync every
`log_every` steps. Only the data source differs between configs (it is `train run`'s
`DataSource` seam). The sync points are timestamped by overriding `_account`, the method the
loop calls right after each sync, so a window between two of them is wall time with the GPU
drained at both ends: warm-up intervals (cudnn autotuning, loader start) are left out, and the
window stops at `steps` or when `cap_seconds` have passed.
"""
from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gpu_report import Mark, window_rate  # bench/ is on sys.path (bench/gpu.py puts it there)
from train.augment import TrainCrop
from train.constants import IMAGENET_MEAN, IMAGENET_STD
from train.data import TrainLoader
from train.dist import init_distributed
from train.model import Recipe
from train.run import RunConfig, ShardData, StopFlag
from train.schedule import parse_schedule
from train.session import Session
from train.synthetic import SyntheticBatches

NUM_CLASSES = 1000  # the ImageNet head, whatever the fixture's class count
LR = 0.01  # constant: random labels at a small LR keep every precision finite
ENDLESS = 10**9


@dataclass(frozen=True)
class Job:
    config: str  # "a" synthetic, "b" ours CPU decode, "c" ours GPU decode, "d" ImageFolder+PIL
    arch: str
    crop_size: int
    batch_size: int
    precision: str = "bf16"
    compile: bool = False


@dataclass(frozen=True)
class Inputs:
    device: str  # "cuda" or "cpu", as `train run --device` takes it
    workers: int
    shard_dirs: dict[int, Path]  # prep_size -> train-<prep_size>/
    folder_dir: Path | None  # full-size ImageFolder root (<fixture>/folders/train)
    recipe: dict[str, Any]
    warmup_steps: int
    steps: int
    log_every: int
    out_dir: Path


class WindowFull(Exception):
    """Raised from the loop's sync point once the timed window has lasted cap_seconds."""


class MeasuredSession(Session):
    """train run's Session; each sync point is also timestamped (see the module doc)."""

    warmup_steps = 0
    cap_seconds = float("inf")

    def _account(self, synced, epoch, step, lr, bar) -> None:
        super()._account(synced, epoch, step, lr, bar)
        self.marks.append(Mark(time.perf_counter(), step + 1, synced["images"], synced["data_wait_s"]))
        started = next((m.time for m in self.marks if m.steps >= self.warmup_steps), None)
        if started is not None and self.marks[-1].steps > self.warmup_steps and \
                self.marks[-1].time - started >= self.cap_seconds:
            raise WindowFull


class EndlessTrainLoader(TrainLoader):
    """Epochs back to back in one DataLoader iteration: a fixture epoch is a few batches."""

    def _plans(self):
        for epoch in itertools.count():
            self.set_epoch(epoch)
            yield from super()._plans()


class FolderLoader:
    """The default a user writes: ImageFolder + PIL, RandomResizedCrop + flip + ToTensor +
    Normalize in the workers, default collate of float batches, pinned, endless sampler."""

    def __init__(self, root: Path, crop_size: int, batch_size: int, workers: int) -> None:
        from torch.utils.data import DataLoader, RandomSampler
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        transform = transforms.Compose([
            transforms.RandomResizedCrop(crop_size), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        dataset = ImageFolder(str(root), transform=transform)
        self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                 sampler=RandomSampler(dataset, num_samples=ENDLESS), drop_last=True,
                                 pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
        self._iterator = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __iter__(self):
        self._iterator = iter(self.loader)
        return self._iterator

    def close(self) -> None:
        if hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()


class PlainCopy:
    """torchvision's reference loop: `x.to(device, non_blocking=True)` at each step on the
    compute stream (no side stream, no look-ahead), then channels_last like our batches."""

    def __init__(self, loader, device: torch.device, channels_last: bool) -> None:
        self.loader, self.device = loader, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.data_wait_seconds = 0.0

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                x, labels = next(batches)
            except StopIteration:
                return
            self.data_wait_seconds += time.perf_counter() - started
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                   labels.to(self.device, non_blocking=True))


class _NoLoader:
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass


@dataclass
class Source:
    """A `DataSource` for Session (only `prefetcher` is used on this path) and the loader."""

    loader: Any
    make_prefetcher: Callable[[Any, torch.device, bool], Any]

    def prefetcher(self, loader, device, channels_last):
        return self.make_prefetcher(loader, device, channels_last)

    def close(self) -> None:
        getattr(self.loader, "close", lambda: None)()


def make_source(job: Job, inputs: Inputs, device: torch.device, prep_size: int) -> Source:
    if job.config == "a":
        return Source(_NoLoader(), lambda loader, dev, cl: SyntheticBatches(
            job.batch_size, job.crop_size, NUM_CLASSES, ENDLESS, dev, cl))
    if job.config in ("b", "c"):
        loader = EndlessTrainLoader(inputs.shard_dirs[prep_size], job.batch_size, TrainCrop(job.crop_size),
                                    workers=inputs.workers, decode="gpu" if job.config == "c" else "cpu",
                                    device=str(device) if job.config == "c" else None)
        return Source(loader, ShardData(inputs.shard_dirs[prep_size].parent).prefetcher)  # train run's
    if job.config == "d":
        loader = FolderLoader(inputs.folder_dir, job.crop_size, job.batch_size, inputs.workers)
        return Source(loader, lambda loader, dev, cl: PlainCopy(loader, dev, cl))
    raise ValueError(f"unknown config {job.config!r}")


def measure(job: Job, inputs: Inputs, prep_size: int, cap_seconds: float) -> dict[str, Any]:
    """Run `job` through train run's loop; img/s, data-wait share and GPU memory peak."""
    phase = {"epochs": [0, 1], "prep_size": prep_size, "crop_size": job.crop_size,
             "batch_size": job.batch_size, "lr": LR}
    loaded = parse_schedule({"recipe": inputs.recipe, "phases": [phase]})
    recipe = Recipe.from_mapping(loaded.recipe, arch=job.arch)
    config = RunConfig(Path("bench/gpu.py"), out_dir=inputs.out_dir / "run", arch=job.arch,
                       device=inputs.device, precision=job.precision, compile=job.compile,
                       workers=inputs.workers, decode="gpu" if job.config == "c" else "cpu",
                       log_every=inputs.log_every, tensorboard=False, progress=False)
    env = init_distributed(inputs.device)
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    torch.manual_seed(0)
    source = make_source(job, inputs, env.device, prep_size)
    session = None
    try:
        session = MeasuredSession(config, loaded, recipe, source, env, NUM_CLASSES, StopFlag())
        session.marks, session.warmup_steps, session.cap_seconds = [], inputs.warmup_steps, cap_seconds
        if job.compile:
            session._warm_up()  # compile the shape before the clock, as train run does
        from tqdm import tqdm

        try:
            session._run_steps(source.loader, loaded.schedule.phases[0],
                               inputs.warmup_steps + inputs.steps, tqdm(disable=True))
        except WindowFull:
            pass
        result = window_rate(session.marks, inputs.warmup_steps)
    finally:
        source.close()
        if session is not None:
            session.log.close()
        del session
        gc.collect()
        if job.compile:
            torch._dynamo.reset()
    if cuda:
        result["gpu_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        torch.cuda.empty_cache()
    return result

"""One row of bench/gpu.py: `train run`'s own step loop, timed at its own sync points.

Public API only. Each measurement sets torch up and builds the trainer with the functions
`train run` uses (`train.engine.build.configure_torch` and `build_trainer`: model, channels_last,
fused SGD, autocast, GradScaler for fp16, torch.compile, cudnn.benchmark, TF32) and drives
`train.engine.loop.train_steps`, the loop `train run` runs every epoch: per step the LR, the step
seed, `ModelStep.accumulate`, the loss summed on the device, and one host sync every
`log_every` steps. Only the batches differ between configs. Its `on_sync` callback
timestamps each sync point, so a window between two of them is wall time with the GPU
drained at both ends: warm-up intervals (cudnn autotuning, loader start) are left out, and the
window stops at `steps` or when `cap_seconds` have passed (on_sync returns True).
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_report import Mark, window_rate  # bench/ is on sys.path (bench/gpu.py puts it there)

from train.bench.phases import SyntheticBatches
from train.data import TrainLoader
from train.data.constants import IMAGENET_MEAN, IMAGENET_STD
from train.data.crops import TrainCrop
from train.data.prefetch import DevicePrefetcher
from train.engine.build import build_trainer, configure_torch
from train.engine.dist import init_distributed
from train.engine.loop import SyncPoint, TrainState, train_steps
from train.engine.step import resolve_precision
from train.plan.config import Recipe, RunConfig

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


class Window:
    """on_sync for train_steps: timestamps each sync point; True once the timed window has
    lasted `cap_seconds` (train_steps then returns)."""

    def __init__(self, warmup_steps: int, cap_seconds: float) -> None:
        self.warmup_steps, self.cap_seconds = warmup_steps, cap_seconds
        self.marks: list[Mark] = []

    def __call__(self, sync: SyncPoint) -> bool:
        self.marks.append(Mark(time.perf_counter(), sync.step, sync.images, sync.data_wait_s))
        started = next((m.time for m in self.marks if m.steps >= self.warmup_steps), None)
        return (
            started is not None
            and self.marks[-1].steps > self.warmup_steps
            and self.marks[-1].time - started >= self.cap_seconds
        )


class EndlessTrainLoader(TrainLoader):
    """Epochs back to back in one DataLoader iteration: a fixture epoch is a few batches."""

    def plans(self):
        for epoch in itertools.count():
            self.set_epoch(epoch)
            yield from super().plans()


class FolderLoader:
    """The default a user writes: ImageFolder + PIL, RandomResizedCrop + flip + ToTensor +
    Normalize in the workers, default collate of float batches, pinned, endless sampler."""

    def __init__(self, root: Path, crop_size: int, batch_size: int, workers: int) -> None:
        from torch.utils.data import DataLoader, RandomSampler
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(crop_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        dataset = ImageFolder(str(root), transform=transform)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            sampler=RandomSampler(dataset, num_samples=ENDLESS),
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def __iter__(self):
        if self.loader is None:
            raise RuntimeError("closed")
        return iter(self.loader)

    def close(self) -> None:
        """Dropping the DataLoader (and so its iterator) stops its workers (torch's finalizer)."""
        self.loader = None


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
            yield (
                x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                labels.to(self.device, non_blocking=True),
            )


@dataclass
class Source:
    """A config's batches on the device, and the loader behind them (None for synthetic)."""

    batches: Any
    loader: Any = None

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


def make_source(job: Job, inputs: Inputs, device: torch.device, prep_size: int) -> Source:
    if job.config == "a":
        return Source(SyntheticBatches(job.batch_size, job.crop_size, NUM_CLASSES, ENDLESS, device))
    if job.config in ("b", "c"):
        gpu = job.config == "c"
        loader = EndlessTrainLoader(
            inputs.shard_dirs[prep_size],
            job.batch_size,
            TrainCrop(job.crop_size),
            workers=inputs.workers,
            decode="gpu" if gpu else "cpu",
            device=str(device) if gpu else None,
        )
        loader.set_epoch(0)
        return Source(DevicePrefetcher(loader, device, channels_last=True), loader)  # train run's
    if job.config == "d":
        loader = FolderLoader(inputs.folder_dir, job.crop_size, job.batch_size, inputs.workers)
        return Source(PlainCopy(loader, device, channels_last=True), loader)
    raise ValueError(f"unknown config {job.config!r}")


def measure(job: Job, inputs: Inputs, prep_size: int, cap_seconds: float) -> dict[str, Any]:
    """Run `job` through train run's loop; img/s, data-wait share and GPU memory peak."""
    recipe = Recipe.from_mapping(inputs.recipe, arch=job.arch)
    config = RunConfig(
        Path("bench/gpu.py"),
        out_dir=inputs.out_dir / "run",
        recipe={"arch": job.arch},
        device=inputs.device,
        precision=job.precision,
        compile=job.compile,
        workers=inputs.workers,
        decode="gpu" if job.config == "c" else "cpu",
        log_every=inputs.log_every,
        tensorboard=False,
        progress=False,
    )
    env = init_distributed(inputs.device)
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    configure_torch(config, env.device)
    source = make_source(job, inputs, env.device, prep_size)
    trainer = None
    try:
        trainer = build_trainer(
            config, recipe, env, NUM_CLASSES, resolve_precision(job.precision, env.device)
        )
        if job.compile:  # compile the shape before the clock, as train run does
            trainer.warm_up(
                [(job.batch_size, job.crop_size)], channels_last=True, say=lambda _: None
            )
        window = Window(inputs.warmup_steps, cap_seconds)
        train_steps(
            trainer,
            TrainState(),
            source.batches,
            steps=inputs.warmup_steps + inputs.steps,
            lr_at=lambda step: LR,
            on_sync=window,
            sync_every=inputs.log_every,
            seed=config.seed,
            env=env,
        )
        result = window_rate(window.marks, inputs.warmup_steps)
    finally:
        source.close()
        del trainer
        gc.collect()
        if job.compile:
            torch.compiler.reset()
    if cuda:
        result["gpu_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        torch.cuda.empty_cache()
    return result

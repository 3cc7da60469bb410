"""`train bench`: per phase, img/s on synthetic on-device batches (the model's ceiling) vs real
shards through the same step loop, and the data-wait share."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from train.data.crops import TrainCrop
from train.engine.dist import resolve_device
from train.engine.loop import DeviceBatches, SyncPoint, TrainState, train_steps
from train.engine.model import build_model
from train.engine.optim import build_optimizer
from train.engine.step import ModelStep, make_scaler, resolve_precision
from train.plan.schedule import Phase

DATA_BOUND_WAIT = 0.10  # >= 10% of step time blocked on the loader: data-bound
SLOWDOWN_RATIO = 0.9  # real below 90% of synthetic without the wait: loading steals compute


def verdict(synthetic_img_per_s: float, real_img_per_s: float, data_wait: float) -> str:
    """data-bound: the model waits for batches. contended: it does not wait, but runs slower
    than on synthetic data (decode workers share the CPU, or copies share the bus). Else
    model-bound: data loading costs nothing measurable."""
    if data_wait >= DATA_BOUND_WAIT:
        return "data-bound"
    if real_img_per_s < SLOWDOWN_RATIO * synthetic_img_per_s:
        return "contended"
    return "model-bound"


class SyntheticBatches:
    """The same random normalized batch, already on the device, `num_batches` times.

    Mimics DevicePrefetcher's output (float, channels_last) with zero data cost, so a timing
    over it is the model's own speed.
    """

    data_wait_seconds = 0.0

    def __init__(
        self,
        batch_size: int,
        crop_size: int,
        num_classes: int,
        num_batches: int,
        device: torch.device,
        channels_last: bool = True,
        seed: int = 0,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, crop_size, crop_size, generator=generator)
        self.x = x.to(device).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.num_batches):
            yield self.x, self.labels


@dataclass(frozen=True)
class BenchConfig:
    phases_path: Path
    data_dir: Path | None = None  # None: synthetic only
    arch: str | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    channels_last: bool = True
    steps: int = 30
    warmup_steps: int = 5
    workers: int = 4
    decode: str = "cpu"
    num_classes: int | None = None  # None: from the shards, else 1000


class EndlessEpochs:
    """A train loader's epochs back to back, through one device prefetcher."""

    def __init__(self, loader, batches: DeviceBatches) -> None:
        if len(loader) == 0:
            raise ValueError("the loader has no batches (batch_size > images?)")
        self.loader, self.batches = loader, batches

    @property
    def data_wait_seconds(self) -> float:
        return self.batches.data_wait_seconds

    def __iter__(self):
        for epoch in itertools.count():
            self.loader.set_epoch(epoch)
            yield from self.batches


def timed_steps(
    trainer: ModelStep, batches: DeviceBatches, warmup: int, steps: int, lr: float = 0.01
) -> dict:
    """img/s and data-wait share of `steps` steps at `lr` after `warmup` untimed ones, timed
    between train_steps' sync points (one every gcd(warmup, steps) steps)."""
    marks: list[tuple[float, SyncPoint]] = []

    def mark(sync: SyncPoint) -> None:
        marks.append((time.perf_counter(), sync))

    train_steps(
        trainer,
        TrainState(),
        batches,
        steps=warmup + steps,
        lr_at=lambda step: lr,
        on_sync=mark,
        sync_every=math.gcd(warmup, steps) or steps,
        seed=None,
    )
    start = next(t for t, sync in marks if sync.step == warmup) if warmup else None
    if start is None:
        raise ValueError("need at least one warm-up step to time after")
    timed = [sync for _, sync in marks if sync.step > warmup]
    seconds = marks[-1][0] - start
    wait = sum(sync.data_wait_s for sync in timed)
    return {
        "img_per_s": sum(sync.images for sync in timed) / seconds,
        "data_wait": wait / seconds,
        "seconds": seconds,
    }


def checked_run_config(config: BenchConfig):
    """The RunConfig whose checks (train.plan.config.check_config) cover the options `train bench`
    shares with `train run`; its own two are checked here."""
    from train.errors import TrainError
    from train.plan.config import RunConfig

    if config.steps < 1 or config.warmup_steps < 0:
        raise TrainError(
            f"--steps must be >= 1 and --warmup >= 0, got {config.steps} and {config.warmup_steps}"
        )
    recipe = {"arch": config.arch} if config.arch is not None else {}
    return RunConfig(
        config.phases_path,
        recipe=recipe,
        device=config.device,
        precision=config.precision,
        workers=config.workers,
        decode=config.decode,
    )


def distinct_phases(schedule: Any) -> list[tuple[Phase, int]]:
    """(phase, crop) per distinct (train shards, crop, batch, min_scale): every crop of a ramp."""
    seen: dict[tuple, tuple[Phase, int]] = {}
    for epoch in range(schedule.num_epochs):
        phase = schedule.phase_at(epoch)
        crop_size = phase.crop_size_at(epoch)
        key = (phase.train_dir_name, crop_size, phase.batch_size, phase.min_scale)
        seen.setdefault(key, (phase, crop_size))
    return list(seen.values())


def bench_step(config: BenchConfig, recipe: Any, num_classes: int, device, precision) -> ModelStep:
    """A fresh model (same init each time) and its step, as `train run` builds them."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    module = build_model(recipe, num_classes).to(device, memory_format=memory_format)
    model = torch.compile(module, dynamic=False) if config.compile else module
    optimizer = build_optimizer(module, recipe, device)
    scaler = make_scaler(device, precision)
    return ModelStep(
        model,
        optimizer,
        device,
        precision,
        recipe.label_smoothing,
        scaler,
        loss=recipe.loss,
        bce_target_threshold=recipe.bce_target_threshold,
        grad_clip=recipe.grad_clip,
    )


def real_rates(
    config: BenchConfig, trainer: ModelStep, data: Any, phase: Phase, crop_size: int, device
) -> dict[str, float]:
    """img/s and data-wait share of `trainer` fed from the phase's shards."""
    loader = data.train_loader(
        phase.train_dir_name,
        phase.batch_size,
        TrainCrop(crop_size, phase.min_scale),
        rank=0,
        world_size=1,
        seed=0,
        workers=config.workers,
        decode=config.decode,
        device=str(device) if config.decode == "gpu" else None,
        augment=None,
    )
    try:
        batches = EndlessEpochs(loader, data.prefetcher(loader, device, config.channels_last))
        return timed_steps(trainer, batches, config.warmup_steps, config.steps)
    finally:
        loader.close()


def bench_phases(config: BenchConfig, data: Any = None) -> list[dict[str, Any]]:
    """One row per distinct (train shards, crop, batch) of the schedule; see module doc."""
    from train.run.main import load_inputs
    from train.run.shards import ShardData, check_shards

    loaded, recipe = load_inputs(checked_run_config(config))
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if data is None and config.data_dir is not None:
        data = ShardData(config.data_dir)
    num_classes = config.num_classes or (
        len(check_shards(loaded.schedule, data)) if data is not None else 1000
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for phase, crop_size in distinct_phases(loaded.schedule):
        trainer = bench_step(config, recipe, num_classes, device, precision)
        synthetic = SyntheticBatches(
            phase.batch_size,
            crop_size,
            num_classes,
            config.warmup_steps + config.steps,
            device,
            config.channels_last,
        )
        rate = timed_steps(trainer, synthetic, config.warmup_steps, config.steps)["img_per_s"]
        row = {
            "phase_epochs": list(phase.epochs),
            "train_dir": phase.train_dir_name,
            "crop_size": crop_size,
            "batch_size": phase.batch_size,
            "synthetic_img_per_s": rate,
            "real_img_per_s": None,
            "data_wait": None,
            "verdict": "synthetic only",
        }
        if data is not None:
            real = real_rates(config, trainer, data, phase, crop_size, device)
            row.update(
                real_img_per_s=real["img_per_s"],
                data_wait=real["data_wait"],
                verdict=verdict(rate, real["img_per_s"], real["data_wait"]),
            )
        rows.append(row)
    return rows


def format_bench(rows: list[dict[str, Any]]) -> str:
    header = (
        "epochs",
        "train_dir",
        "crop",
        "batch/gpu",
        "synthetic img/s",
        "real img/s",
        "data_wait",
        "verdict",
    )
    body = [header]
    for r in rows:
        real = "-" if r["real_img_per_s"] is None else f"{r['real_img_per_s']:,.0f}"
        wait = "-" if r["data_wait"] is None else f"{100 * r['data_wait']:.0f}%"
        body.append(
            (
                f"{r['phase_epochs'][0]}-{r['phase_epochs'][1]}",
                r["train_dir"],
                str(r["crop_size"]),
                str(r["batch_size"]),
                f"{r['synthetic_img_per_s']:,.0f}",
                real,
                wait,
                r["verdict"],
            )
        )
    widths = [max(len(row[c]) for row in body) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in body)

"""`train bench --optimizers`: each optimizer's training-step time against SGD's, same model, same
(batch, crop), synthetic on-device data; and the optimizer's step() alone, where they differ."""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Any

import torch

from train.bench.phases import (
    BenchConfig,
    SyntheticBatches,
    bench_step,
    checked_run_config,
    distinct_phases,
    timed_steps,
)
from train.engine.dist import resolve_device
from train.engine.optim import implementation
from train.engine.step import resolve_precision
from train.plan.config import TIMM_OPTIMIZERS, Recipe

# (row name, optimizer, grad_clip): every optimizer unclipped, and SGD clipped for the clip's cost
OPTIMIZER_ROWS = (
    ("sgd", "sgd", 0.0),
    ("sgd + grad_clip", "sgd", 1.0),
    ("adamw", "adamw", 0.0),
    ("lamb", "lamb", 0.0),
    ("lars", "lars", 0.0),
)
OPTIMIZER_STEP_CALLS = 10  # optimizer.step() calls timed alone, on the last step's gradients
ROUNDS = 3


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    from train.bench.loader import machine_description

    return f"{machine_description()}; {torch.get_num_threads()} torch threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_optimizer_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Seconds per optimizer.step() on the gradients left by the last training step."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(OPTIMIZER_STEP_CALLS):
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) / OPTIMIZER_STEP_CALLS


def time_optimizers(
    config: BenchConfig,
    recipe: Recipe,
    batch_size: int,
    crop_size: int,
    num_classes: int,
    device: torch.device,
    precision: str,
) -> list[dict[str, Any]]:
    """One row per OPTIMIZER_ROWS entry: ms per training step and per optimizer.step(), each
    the best of ROUNDS rounds that take the rows in turn (a shared machine's load drifts: turns
    spread it over all rows, the best round is the least disturbed), and the ratio to SGD's.
    timm's rows say so and are skipped without timm."""
    rows, trainers = [], []
    for name, optimizer, grad_clip in OPTIMIZER_ROWS:
        row: dict[str, Any] = {"optimizer": name, "kernels": None, "step_ms": None, "note": ""}
        if optimizer in TIMM_OPTIMIZERS and importlib.util.find_spec("timm") is None:
            row["note"] = "needs timm"
            trainer = None
        else:
            variant = dataclasses.replace(recipe, optimizer=optimizer, grad_clip=grad_clip)
            trainer = bench_step(config, variant, num_classes, device, precision)
            row["kernels"] = implementation(trainer.optimizer)
        rows.append(row)
        trainers.append(trainer)
    batches = SyntheticBatches(
        batch_size,
        crop_size,
        num_classes,
        config.warmup_steps + config.steps,
        device,
        config.channels_last,
    )
    for _ in range(ROUNDS):
        for row, trainer in zip(rows, trainers):
            if trainer is None:
                continue
            # lr 0: every optimizer still does all its arithmetic, and every row and round
            # steps the same model on the same batch (at a real LR each row would drift to
            # its own weights, fitting the one synthetic batch at its own pace).
            timed = timed_steps(trainer, batches, config.warmup_steps, config.steps, lr=0.0)
            step_ms = 1000 * timed["seconds"] / config.steps
            alone_ms = 1000 * time_optimizer_step(trainer.optimizer, device)
            row["step_ms"] = min(step_ms, row["step_ms"] or step_ms)
            row["optimizer_step_ms"] = min(alone_ms, row.get("optimizer_step_ms") or alone_ms)
    sgd = rows[0]["step_ms"]
    for row in rows:
        row["vs_sgd"] = row["step_ms"] / sgd if row["step_ms"] is not None else None
    return rows


def bench_optimizers(config: BenchConfig) -> tuple[str, list[dict[str, Any]]]:
    """(the setting line, the rows) at the schedule's first (batch, crop)."""
    from train.run.main import load_inputs

    loaded, recipe = load_inputs(checked_run_config(config))
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    phase, crop_size = distinct_phases(loaded.schedule)[0]
    num_classes = config.num_classes or 1000
    rows = time_optimizers(
        config, recipe, phase.batch_size, crop_size, num_classes, device, precision
    )
    setting = (
        f"{recipe.arch}, batch {phase.batch_size} x {crop_size} px, {num_classes} classes, "
        f"{precision}{', compiled' if config.compile else ''}, synthetic data; "
        f"best of {ROUNDS} rounds of {config.steps} timed steps after {config.warmup_steps}; "
        f"on {machine_name(device)}"
    )
    return setting, rows


def format_optimizer_rows(setting: str, rows: list[dict[str, Any]]) -> str:
    header = ("optimizer", "kernels", "ms/step", "x sgd", "optimizer.step() ms", "note")
    body = [header]
    for r in rows:
        timed = r["step_ms"] is not None
        body.append(
            (
                r["optimizer"],
                r["kernels"] or "-",
                f"{r['step_ms']:.1f}" if timed else "-",
                f"{r['vs_sgd']:.2f}" if timed else "-",
                f"{r['optimizer_step_ms']:.1f}" if timed else "-",
                r["note"],
            )
        )
    widths = [max(len(row[c]) for row in body) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join([setting, *lines])

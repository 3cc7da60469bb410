"""What `train.engine.loop.train_steps` costs per step beyond the step itself: a tiny model
(a step of about a millisecond, so overhead shows) run through `train_steps` (seeded, a host
sync every `--sync-every` steps, as `train run` does) and through a bare `trainer.step` loop, in one
process, interleaved over `--repeats` rounds. Prints per-step microseconds of each and the
difference, plus the machine.

    python bench/loop_overhead.py [--steps 400] [--repeats 7] [--sync-every 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from train.bench.loader import machine_description  # noqa: E402
from train.engine.loop import TrainState, train_steps  # noqa: E402
from train.engine.optim import build_optimizer  # noqa: E402
from train.engine.step import ModelStep  # noqa: E402
from train.plan.config import Recipe  # noqa: E402

CPU = torch.device("cpu")


class Repeat:
    """The same batch `count` times, as DeviceBatches."""

    data_wait_seconds = 0.0

    def __init__(self, batch, count: int) -> None:
        self.batch, self.count = batch, count

    def __iter__(self):
        for _ in range(self.count):
            yield self.batch


def tiny_trainer() -> ModelStep:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    return ModelStep(model, build_optimizer(model, Recipe(), CPU), CPU, "fp32", 0.1)


def bare(trainer: ModelStep, batch, steps: int) -> float:
    started = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(steps):
        total += trainer.step(*batch, lr=0.01)
    total.item()
    return (time.perf_counter() - started) / steps


def looped(trainer: ModelStep, batch, steps: int, sync_every: int) -> float:
    started = time.perf_counter()
    train_steps(
        trainer,
        TrainState(),
        Repeat(batch, steps),
        steps=steps,
        lr_at=lambda s: 0.01,
        on_sync=lambda sync: None,
        sync_every=sync_every,
        seed=0,
    )
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sync-every", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = (torch.randn(8, 3, 16, 16), torch.arange(8) % 10)
    trainer = tiny_trainer()
    bare(trainer, batch, 50)  # warm-up
    rounds = []
    for repeat in range(args.repeats):
        if repeat % 2 == 0:  # alternate which goes first
            b = bare(trainer, batch, args.steps)
            lp = looped(trainer, batch, args.steps, args.sync_every)
        else:
            lp = looped(trainer, batch, args.steps, args.sync_every)
            b = bare(trainer, batch, args.steps)
        rounds.append((b, lp))
    bare_us = [1e6 * b for b, _ in rounds]
    loop_us = [1e6 * lp for _, lp in rounds]
    diffs = [lp - b for b, lp in zip(bare_us, loop_us)]
    print(f"machine: {machine_description()}")
    print(
        f"bare trainer.step loop: {statistics.median(bare_us):.1f} us/step (median of "
        f"{args.repeats})"
    )
    print(
        f"train_steps (seeded, sync every {args.sync_every}): {statistics.median(loop_us):.1f} "
        "us/step"
    )
    print(
        f"train_steps overhead: {statistics.median(diffs):+.1f} us/step (range {min(diffs):+.1f} "
        f"to {max(diffs):+.1f}); ratio "
        f"{statistics.median(lp / b for b, lp in zip(bare_us, loop_us)):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The public step loop (`train_steps` over a `TrainState`, `on_sync` at each host sync) and one
evaluation pass."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from train.engine.dist import DistEnv, all_reduce_sum
from train.engine.step import ModelStep, autocast, step_seed
from train.errors import TrainError


class DeviceBatches(Protocol):
    """(x, labels) on the device, and the seconds spent blocked waiting for them so far."""

    data_wait_seconds: float

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class EpochSums:
    """Sums over the epoch so far, kept in checkpoints so a resumed epoch reports the whole of
    it; per-rank quantities as their mean over ranks, so an epoch resumed on another world size
    weighs every step alike."""

    loss_sum: float = 0.0  # of each optimizer step's mean loss
    batches: float = 0.0  # optimizer steps
    images: float = 0.0  # over all ranks
    data_wait_s: float = 0.0  # mean over ranks
    train_s: float = 0.0


@dataclass
class TrainState:
    """Where training stands: the next optimizer step is `step` of `epoch`."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    sums: EpochSums = field(default_factory=EpochSums)
    elapsed_s: float = 0.0  # training + evaluation time of earlier processes of this run
    eval_s: float = 0.0

    def next_epoch(self) -> None:
        self.epoch, self.step, self.sums = self.epoch + 1, 0, EpochSums()


@dataclass(frozen=True)
class SyncPoint:
    """One host sync: what happened since the previous one, summed over ranks."""

    epoch: int
    step: int  # optimizer steps done in the epoch
    global_step: int
    lr: float  # of the last step
    loss_sum: float
    batches: float  # optimizer steps (x ranks)
    images: float
    seconds: float  # wall time of this interval, on this rank
    data_wait_s: float  # x ranks
    world_size: int
    stop: bool  # some rank asked to stop
    checkpoint_due: bool
    last: bool  # the epoch's last step

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.batches, 1)

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait(self) -> float:
        """Share of the interval spent waiting for data, averaged over ranks."""
        return self.data_wait_s / max(self.seconds * self.world_size, 1e-9)


class _Interval:
    """Loss and counts since the last sync point, accumulated on the device (no host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.batches, self.images, self.started = 0, 0, time.monotonic()

    def sync(self, env: DistEnv | None, data_wait_s: float, stop: bool) -> list[float]:
        """One all-reduce: [loss, batches, images, data wait, stop votes, seconds]."""
        values = torch.stack(
            [
                self.loss_sum,
                *(
                    torch.tensor(v, dtype=torch.float64, device=self.device)
                    for v in (self.batches, self.images, data_wait_s, float(stop))
                ),
            ]
        )
        reduced = all_reduce_sum(env, values).tolist()
        seconds = time.monotonic() - self.started
        self.reset()
        return [*reduced, seconds]


def train_steps(
    trainer: ModelStep,
    state: TrainState,
    batches: DeviceBatches,
    *,
    steps: int,
    lr_at: Callable[[int], float],
    on_sync: Callable[[SyncPoint], bool | None],
    sync_every: int = 20,
    accum_steps: int = 1,
    checkpoint_every: int = 0,
    seed: int | None = 0,
    env: DistEnv | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> float:
    """Optimizer steps `state.step .. steps - 1` of `state.epoch`; returns the last LR."""
    interval, rank = _Interval(trainer.device), env.rank if env is not None else 0
    distributed = env is not None and env.distributed
    wait_seen, lr, group = batches.data_wait_seconds, 0.0, []
    for x, labels in batches:
        group.append((x, labels))
        if len(group) < accum_steps:
            continue
        step = state.step
        lr = lr_at(step)
        first = step * accum_steps
        seeds = [
            None if seed is None else step_seed(seed, state.epoch, first + i, rank)
            for i in range(accum_steps)
        ]
        interval.loss_sum += trainer.accumulate(group, lr, seeds)
        interval.batches += 1
        interval.images += sum(int(batch_labels.shape[0]) for _, batch_labels in group)
        group = []
        state.step, state.global_step = step + 1, state.global_step + 1
        due = (
            bool(checkpoint_every)
            and state.global_step % checkpoint_every == 0
            and state.step < steps
        )
        stop = not distributed and stop_requested()
        if due or stop or state.step % sync_every == 0 or state.step == steps:
            wait, waited = batches.data_wait_seconds, batches.data_wait_seconds - wait_seen
            sync = _sync_point(interval, env, state, lr, waited, stop_requested(), due, steps)
            wait_seen = wait
            if on_sync(sync) or state.step >= steps:
                return lr
    raise TrainError(
        f"epoch {state.epoch}: the train loader stopped after "
        f"{state.step * accum_steps} of its {steps * accum_steps} batches"
    )


def _sync_point(
    interval: _Interval,
    env: DistEnv | None,
    state: TrainState,
    lr: float,
    waited: float,
    stop: bool,
    due: bool,
    steps: int,
) -> SyncPoint:
    """The one host sync: all-reduce the interval's sums, fold them into the epoch's."""
    loss_sum, count, images, waited, votes, seconds = interval.sync(env, waited, stop)
    world_size = env.world_size if env else 1
    sync = SyncPoint(
        state.epoch,
        state.step,
        state.global_step,
        lr,
        loss_sum,
        count,
        images,
        seconds,
        waited,
        world_size,
        votes > 0,
        due,
        state.step == steps,
    )
    _fold(state.sums, sync)
    return sync


def _fold(sums: EpochSums, sync: SyncPoint) -> None:
    ranks = sync.world_size
    sums.loss_sum += sync.loss_sum / ranks
    sums.batches += sync.batches / ranks
    sums.images += sync.images
    sums.data_wait_s += sync.data_wait_s / ranks
    sums.train_s += sync.seconds


def sums_from_dict(values: dict) -> EpochSums:
    return EpochSums(**{f.name: float(values[f.name]) for f in dataclasses.fields(EpochSums)})


@dataclass
class EvalSums:
    """Counts summed over a pass (and, after all_reduce, over ranks): exact top-k."""

    correct1: float = 0.0
    correct5: float = 0.0
    count: float = 0.0
    loss_sum: float = 0.0

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> EvalSums:
        return cls(*values.tolist())

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / self.count if self.count else float("nan")

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / self.count if self.count else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


@torch.no_grad()
def evaluate(
    module: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str,
    flip: bool = False,
) -> torch.Tensor:
    """Sum of top-1/top-5 hits, count and loss over this rank's batches, as a device tensor."""
    was_training = module.training
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for x, labels in batches:
        if x.shape[0] == 0:
            continue
        with autocast(device, precision):
            logits = module(x)
            if flip:
                logits = logits + module(torch.flip(x, dims=[3]))
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels.view(-1, 1)
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += labels.shape[0]
        sums[3] += F.cross_entropy(logits / (2 if flip else 1), labels, reduction="sum")
    module.train(was_training)
    return sums

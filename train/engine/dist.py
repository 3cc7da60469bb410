"""Process group from torchrun's environment, rank helpers, and all-reduce of metrics."""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as torch_dist

from train.engine.launch import env_int
from train.errors import TrainError

T = TypeVar("T")

TEARDOWN_SECONDS = 60.0  # destroying the process group takes well under a second when healthy
WORKER_DRAIN_SECONDS = 0.2
RENDEZVOUS_SECONDS_ENV = "TRAIN_RENDEZVOUS_SECONDS"
DEFAULT_RENDEZVOUS_SECONDS = 120.0
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU when CUDA is there, else CPU; 'cuda' pins the local rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda, but CUDA is not available here")
        count = torch.cuda.device_count()
        if count == 1:  # a launcher that shows each process only its own GPU
            return torch.device("cuda", 0)
        if local_rank >= count:
            raise TrainError(f"LOCAL_RANK {local_rank} but only {count} GPUs are visible")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise TrainError(f"unknown device {device!r}; use auto, cuda or cpu")


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise TrainError(f"RANK {rank} is outside WORLD_SIZE {world_size}")
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)  # before NCCL init: one GPU per process
    if world_size == 1:
        return DistEnv(0, 1, local_rank, torch_device, None)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        store = rendezvous(rank, world_size)
        kwargs = {"device_id": torch_device} if backend == "nccl" else {}
        torch_dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
    return DistEnv(rank, world_size, local_rank, torch_device, backend)


def rendezvous(rank: int, world_size: int) -> torch_dist.Store:
    """The ranks meet within TRAIN_RENDEZVOUS_SECONDS, not the collectives' 30 min: variables
    left over in a shell (no torchrun) are one line, not a silent wait. As init_process_group
    does it itself (env://, then a PrefixStore), only with its own timeout."""
    seconds = rendezvous_seconds()
    try:
        meeting = torch_dist.rendezvous(
            "env://", rank, world_size, timeout=datetime.timedelta(seconds=seconds)
        )
        store, _, _ = next(meeting)
    except (RuntimeError, ValueError, TimeoutError) as exc:  # DistStoreError is a RuntimeError
        names = " ".join(f"{n}={os.environ[n]}" for n in LAUNCH_VARIABLES if n in os.environ)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TrainError(
            f"{names} are set, but the ranks did not meet within {seconds:g} s ({reason}): "
            f"left over from another job? unset them for a single-process run, or start the "
            f"ranks with torchrun ({RENDEZVOUS_SECONDS_ENV} sets the wait)"
        ) from None
    return torch_dist.PrefixStore("default_pg", store)


def rendezvous_seconds() -> float:
    value = os.environ.get(RENDEZVOUS_SECONDS_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_RENDEZVOUS_SECONDS
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise TrainError(f"{RENDEZVOUS_SECONDS_ENV}={value!r}: need a number of seconds > 0")
    return seconds


def shutdown(env: DistEnv, seconds: float = TEARDOWN_SECONDS) -> None:
    """Destroy the process group, after the DDP model is dropped (its reducer holds the group).
    The group's destructor joins gloo's worker threads holding the GIL; a worker still freeing
    a finished collective's tensors needs the GIL once more, and then both wait forever
    (docs/DESIGN.md, dist.py). So: collect, let the workers take the GIL, and bound
    the wait: faulthandler's watchdog needs no GIL, prints each thread's stack and exits."""
    if not (env.distributed and torch_dist.is_initialized()):
        return
    gc.collect()
    time.sleep(WORKER_DRAIN_SECONDS)  # releases the GIL
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        torch_dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()


def rank_zero_agreed(env: DistEnv, effect: Callable[[], T]) -> T | None:
    """`effect()` on rank 0 alone; a TrainError it raises is raised on every rank, with the
    same line, so no rank waits in a later collective for a rank 0 that has failed. One
    broadcast (also the point where every rank waits for rank 0's effect to be done)."""
    result, message = None, None
    if env.is_main:
        try:
            result = effect()
        except TrainError as exc:
            message = str(exc)
    if env.distributed:
        box = [message]
        torch_dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise TrainError(message)
    return result


def all_reduce_sum(env: DistEnv | None, values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64/int64 tensor over ranks (in place, returned); identity on 1 rank."""
    if env is not None and env.distributed:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


def all_reduce_max(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX)
    return values


def broadcast_buffers(env: DistEnv, module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics to every rank, so evaluation matches the checkpoint."""
    if env.distributed:
        for buffer in module.buffers():
            torch_dist.broadcast(buffer, src=0)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            torch_dist.barrier(device_ids=[env.device.index])
        else:
            torch_dist.barrier()

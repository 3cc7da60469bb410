"""The threaded loader's machinery: batches in plan order whatever the threads' timing, the ring
never overwriting a batch still in use (kept, viewed or being read), memory reused in the
steady state, errors at the batch they belong to, and clean shutdown (break, close, an
exception or Ctrl-C in the consumer, dropping the loader): no thread outlives its iteration."""

from __future__ import annotations

import gc
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.loader_shards import dataset_dir
from train.data.crops import TrainCrop
from train.data.loaders import RING_SLOTS, TrainLoader, ValLoader
from train.data.ring import BatchRing
from train.data.threads import WorkerThreads

REPO = Path(__file__).resolve().parents[3]


def loader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("loader-")]


class SlowBuilder:
    """A fake batch builder: plan p makes the batch [p] * 4 in a ring slot, chunks at random
    speeds."""

    def __init__(self, fail_at: int | None = None, fail_in: str = "fill"):
        self.fail_at, self.fail_in, self.rng, self.lock = (
            fail_at,
            fail_in,
            random.Random(0),
            threading.Lock(),
        )

    def start(self, plan, number, ring):
        if plan == self.fail_at and self.fail_in == "start":
            raise ValueError(f"cannot start {plan}")

        class Work:
            num_chunks = 2

        work = Work()
        work.plan, work.number = plan, number
        work.images = (
            ring.images(number, 4, 1, 1) if ring is not None else np.zeros((4, 1, 1, 3), np.uint8)
        )
        return work

    def fill(self, work, chunk):
        with self.lock:
            delay = self.rng.random() * 0.004
        time.sleep(delay)
        if work.plan == self.fail_at and self.fail_in == "fill":
            raise ValueError(f"cannot fill {work.plan}")
        work.images[chunk * 2 : chunk * 2 + 2] = work.plan

    def finish(self, work, ring):
        images = (
            ring.hand_out(work.number, work.images)
            if ring is not None
            else torch.from_numpy(work.images)
        )
        return images, work.plan


@pytest.mark.parametrize("num_threads", [0, 1, 4])
@pytest.mark.parametrize("with_ring", [True, False])
def test_batches_come_in_plan_order_whatever_the_timing(num_threads, with_ring):
    ring = BatchRing(3, pin=False) if with_ring else None
    workers = WorkerThreads(SlowBuilder(), num_threads, ring, max_ahead=3)
    seen = [(int(images.flatten()[0]), plan) for images, plan in workers.batches(iter(range(40)))]
    assert seen == [(p, p) for p in range(40)]
    assert not loader_threads()


@pytest.mark.parametrize("fail_in", ["start", "fill"])
def test_a_failure_is_raised_at_its_batch_after_the_ones_before(fail_in):
    workers = WorkerThreads(SlowBuilder(fail_at=7, fail_in=fail_in), 3, BatchRing(3, pin=False))
    seen = []
    with pytest.raises(ValueError, match=f"cannot {fail_in} 7"):
        for _, plan in workers.batches(iter(range(20))):
            seen.append(plan)
    assert seen == list(range(7)) and not loader_threads()


def test_ring_never_overwrites_a_batch_in_use():
    """A batch stays as it was while the consumer holds it, however long, with threads racing
    ahead; a kept batch, or only a view of one, stays intact after the consumer moves on; and
    dropped batches let the ring reuse its memory (no allocation in the steady state)."""
    ring = BatchRing(3, pin=False)
    workers = WorkerThreads(SlowBuilder(), 4, ring, max_ahead=3)
    kept, views = {}, {}
    for images, plan in workers.batches(iter(range(30))):
        first = images.clone()
        time.sleep(0.01)  # the threads fill the other slots meanwhile
        assert torch.equal(images, first), plan
        if plan in (5, 6):
            kept[plan] = images  # the batch itself
        if plan == 9:
            views[plan] = images[1:3, :, 0, 0]  # only a view of it
    assert {plan: int(images.flatten()[0]) for plan, images in kept.items()} == {5: 5, 6: 6}
    assert views[9].flatten().tolist() == [9] * 6
    assert ring.allocations == 3 + 3  # the slots, plus a new one for each of 5, 6 and 9


def test_ring_waits_for_the_slot_before_reuse():
    ring = BatchRing(2, pin=False)
    assert ring.is_free(0) and ring.is_free(1) and not ring.is_free(2)
    ring.release(0)
    assert ring.is_free(2) and not ring.is_free(3)
    with pytest.raises(ValueError):
        BatchRing(1, pin=False)


@pytest.mark.parametrize("how", ["break", "close", "exception", "drop"])
def test_no_thread_outlives_its_iteration(built_shards, how):
    loader = TrainLoader(dataset_dir(built_shards), 2, TrainCrop(32), workers=3, executor="threads")
    batches = iter(loader)
    next(batches)
    assert len(loader_threads()) == 3
    if how == "break":
        for _ in batches:
            break
        batches.close()
    elif how == "close":
        loader.close()
        with pytest.raises(StopIteration):
            next(batches)
    elif how == "exception":
        with pytest.raises(RuntimeError):
            for _ in batches:
                raise RuntimeError("the training step failed")
        del batches
    else:
        del batches, loader
        gc.collect()
    deadline = time.monotonic() + 5
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loader_threads()


def test_threaded_loader_memory_is_flat_over_epochs(built_shards):
    loader = TrainLoader(
        dataset_dir(built_shards, "msgpack"), 2, TrainCrop(48), workers=2, executor="threads"
    )
    for epoch in range(6):
        loader.set_epoch(epoch)
        for images, _ in loader:
            assert images.shape == (2, 3, 48, 48)
    assert (
        loader._threads.ring.allocations == RING_SLOTS
    )  # private: the test reads the ring's count
    val = ValLoader(
        dataset_dir(built_shards, "msgpack", "val"), 5, 48, workers=2, rect=True, executor="threads"
    )
    shapes = [tuple(images.shape) for epoch in range(3) for images, _ in val]
    assert (
        len(set(shapes)) > 1 and val._threads.ring.allocations <= 2 * RING_SLOTS
    )  # private, as above


def test_ctrl_c_stops_a_threaded_loader_at_once(built_shards):
    """SIGINT in a process iterating a threaded loader: KeyboardInterrupt, exit, no hang."""
    script = """
import itertools, sys
from train.data.crops import TrainCrop
from train.data.loaders import TrainLoader
loader = TrainLoader(sys.argv[1], 2, TrainCrop(64), workers=2, executor="threads")
print("started", flush=True)
try:
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for images, labels in loader:
            pass
except KeyboardInterrupt:
    import threading
    alive = [t.name for t in threading.enumerate() if t.name.startswith("loader-")]
    print("interrupted", alive, flush=True)
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(dataset_dir(built_shards))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "started"
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert out.strip() == "interrupted []"


@pytest.mark.gpu
def test_pinned_ring_batches_survive_their_non_blocking_copies(built_shards):
    """CUDA: the ring is pinned, and a DevicePrefetcher's non_blocking copies always read the
    batch they were given (each slot waits for its copy's event before it is refilled)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from train.data.prefetch import DevicePrefetcher, normalize

    directory = dataset_dir(built_shards)
    reference = [
        normalize(images.clone())
        for images, _ in TrainLoader(directory, 2, TrainCrop(64), workers=0)
    ]
    loader = TrainLoader(directory, 2, TrainCrop(64), workers=3, executor="threads")
    images, _ = next(iter(loader))
    assert images.is_pinned() and loader._threads.ring.pin  # private: the test checks the ring
    for _ in range(3):
        on_device = [x.cpu() for x, _ in DevicePrefetcher(loader, torch.device("cuda"))]
        assert len(on_device) == len(reference)
        assert all(torch.allclose(a, b) for a, b in zip(on_device, reference))
    loader.close()

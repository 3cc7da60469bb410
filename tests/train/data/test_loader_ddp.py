"""TrainLoader / ValLoader under real DDP: 2 gloo processes on this machine, each rank its own
loader. Train: equal batch counts, disjoint samples. Val: equal step counts (a collective per
step would hang otherwise) and every image counted exactly once."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist

from tests.loader_shards import dataset_dir
from train.data.crops import TrainCrop
from train.data.loaders import TrainLoader, ValLoader

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(rank: int, port: int, train_dir, val_dir, results) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
        train = TrainLoader(
            train_dir, 2, TrainCrop(32), rank=rank, world_size=WORLD_SIZE, workers=0, seed=3
        )
        train.set_epoch(1)
        train_indices = [batch.indices.tolist() for batch in train.sampler]
        train_labels = [labels.tolist() for _, labels in train]
        val_seen, val_steps, images_counted = [], 0, torch.zeros(1, dtype=torch.int64)
        for rect in (False, True):
            val = ValLoader(val_dir, 5, 32, rank=rank, world_size=WORLD_SIZE, workers=0, rect=rect)
            for (images, labels), plan in zip(val, val.plans()):
                step_count = torch.tensor([len(labels)])
                dist.all_reduce(step_count)  # as a DDP evaluation step does: every rank must come
                images_counted += len(labels)
                val_seen.append(plan.batch.indices.tolist())
                val_steps += 1
        dist.all_reduce(images_counted)
        results.put((rank, train_indices, train_labels, val_seen, val_steps, int(images_counted)))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, traceback.format_exc()))


def test_two_gloo_ranks_partition_train_and_count_val_once(built_shards):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    train_dir, val_dir = (
        dataset_dir(built_shards, "lmdb"),
        dataset_dir(built_shards, "msgpack", "val"),
    )
    processes = [
        context.Process(target=rank_main, args=(rank, port, train_dir, val_dir, results))
        for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = dict(
            (result[0], result[1:]) for result in (results.get(timeout=60) for _ in processes)
        )
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    for rank, outcome in outcomes.items():
        if len(outcome) == 1:
            pytest.fail(f"rank {rank} failed:\n{outcome[0]}")
    (indices_0, labels_0, val_0, steps_0, counted), (indices_1, _, val_1, steps_1, _) = (
        outcomes[0],
        outcomes[1],
    )
    assert len(indices_0) == len(indices_1) == 18 // (2 * WORLD_SIZE)
    flat_0 = [i for batch in indices_0 for i in batch]
    flat_1 = [i for batch in indices_1 for i in batch]
    assert not set(flat_0) & set(flat_1) and len(set(flat_0 + flat_1)) == 16
    assert [len(labels) for labels in labels_0] == [2] * 4
    assert (
        steps_0 == steps_1 == 2 * 2
    )  # 12 val images in batches of 5 -> 3 batches -> 2 steps/rank; twice
    assert counted == 2 * 12  # center + rect, each image once
    for rect_pass in (slice(0, 2), slice(2, 4)):
        seen = [i for batch in val_0[rect_pass] + val_1[rect_pass] for i in batch]
        assert sorted(seen) == list(range(12))

"""train.data.loaders: TrainLoader and ValLoader over both stores, with worker threads and worker
processes: batch shapes and contents, independence of the workers' kind and count, resume
inside an epoch, in-place crop changes, exact validation counting, and errors that name the
record. (The threads' ring and shutdown: tests/test_loader_threads.py; the decoders:
tests/test_loader_decode.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats import DatasetError
from tests.loader_shards import STORES, corrupt_record, damaged_copy, dataset_dir
from train.data import decode
from train.data.crops import (
    TrainCrop,
    center_crop_box,
    dct_scale_for_box,
    rect_crop_box,
    rect_target_size,
)
from train.data.loaders import TrainLoader, ValLoader
from train.data.samplers import TrainPlan

# (executor, workers): every way a loader can run; 0 workers builds in the consumer's thread.
RUNS = [("threads", 0), ("threads", 1), ("threads", 3), ("processes", 0), ("processes", 2)]


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def stopped_within(pids, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(process_alive(pid) for pid in pids)


def batches_of(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def expected_image(records, index, box, out_height, out_width, flip=False):
    """Image `index` cropped to `box` by the active decode backend, on its own, as CHW."""
    out = np.empty((1, out_height, out_width, 3), dtype=np.uint8)
    failure = decode.decode_crops_into(
        out,
        [records.view(index)],
        records.heights[[index]],
        records.widths[[index]],
        np.array([box]),
        np.array([flip]),
    )
    assert failure is None, failure
    return torch.from_numpy(out[0]).permute(2, 0, 1)


@pytest.mark.parametrize("store", STORES)
def test_train_batches_are_the_planned_crops(built_shards, store):
    loader = TrainLoader(dataset_dir(built_shards, store), 4, TrainCrop(48), workers=0, seed=3)
    loader.set_epoch(1)
    assert len(loader) == 4 and loader.num_images == 18 and loader.num_classes == 3
    batches = batches_of(loader)
    assert len(batches) == 4
    records = loader.records
    all_flips = []
    for batch, (images, labels) in enumerate(batches):
        assert images.shape == (4, 3, 48, 48) and images.dtype == torch.uint8
        assert images.is_contiguous(
            memory_format=torch.channels_last
        )  # NHWC memory, nothing transposed
        assert labels.dtype == torch.int64
        plan = TrainPlan(loader.sampler.batch_indices(batch), loader.crop, loader.seed)
        boxes, flips = plan.boxes_and_flips(records.heights, records.widths)
        all_flips += flips.tolist()
        for slot, index in enumerate(plan.batch.indices.tolist()):
            assert labels[slot] == records.labels[index]
            assert torch.equal(
                images[slot], expected_image(records, index, boxes[slot], 48, 48, flips[slot])
            )
    assert 0 < sum(all_flips) < len(all_flips)


def test_both_stores_give_identical_batches(built_shards):
    lmdb_batches, msgpack_batches = (
        batches_of(TrainLoader(dataset_dir(built_shards, store), 4, TrainCrop(32), workers=0))
        for store in STORES
    )
    assert_same_batches(lmdb_batches, msgpack_batches)


@pytest.mark.parametrize("store", STORES)
def test_workers_kind_and_count_do_not_change_a_bit(built_shards, store):
    """Threads (0, 1, 3) and processes (0, 2): the same bits, train and validation. Batches of 5
    cut into one native chunk each; batches of 17 into two, one of them a single image."""
    runs = {}
    for executor, workers in RUNS:
        train = TrainLoader(
            dataset_dir(built_shards, store),
            17 if workers == 3 else 5,
            TrainCrop(40, min_scale=0.3),
            workers=workers,
            seed=9,
            executor=executor,
        )
        assert train.executor == executor
        train.set_epoch(5)
        val = ValLoader(
            dataset_dir(built_shards, store, "val"),
            5,
            40,
            workers=workers,
            rect=True,
            executor=executor,
        )
        runs[executor, workers] = (batches_of(train), batches_of(val))
        train.close()
        val.close()
    reference = runs[RUNS[0]]
    for key, (train_batches, val_batches) in runs.items():
        if key[1] != 3:
            assert_same_batches(train_batches, reference[0])
        assert_same_batches(val_batches, reference[1])
    big = runs["threads", 3][0]
    assert len(big) == 1 and torch.equal(
        big[0][0][:15], torch.cat([b[0] for b in reference[0]])[:15]
    )


def test_resume_yields_exactly_the_rest_of_the_epoch(built_shards):
    loader = TrainLoader(dataset_dir(built_shards, "msgpack"), 2, TrainCrop(32), workers=1, seed=1)
    loader.set_epoch(2)
    full = batches_of(loader)
    loader.set_epoch(2, start_batch=5)
    assert_same_batches(batches_of(loader), full[5:])
    loader.set_epoch(3)
    other_epoch = batches_of(loader)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other_epoch))
    loader.close()


def test_set_crop_keeps_workers_and_store(built_shards):
    loader = TrainLoader(
        dataset_dir(built_shards), 4, TrainCrop(48), workers=1, executor="processes"
    )
    first = batches_of(loader)
    pids = loader.worker_pids()
    assert len(pids) == 1 and first[0][0].shape[-1] == 48
    loader.set_crop(TrainCrop(24, min_scale=0.5))
    second = batches_of(loader)
    assert second[0][0].shape == (4, 3, 24, 24) and loader.worker_pids() == pids
    loader.close()
    in_process = TrainLoader(
        dataset_dir(built_shards, "msgpack"), 4, TrainCrop(48), workers=2, executor="threads"
    )
    batches_of(in_process)
    maps = dict(in_process.records._reader._maps)
    in_process.set_crop(TrainCrop(24))
    batches_of(in_process)
    assert maps and all(
        in_process.records._reader._maps[shard] is mapped for shard, mapped in maps.items()
    )


def test_ranks_split_the_single_process_batch(built_shards):
    """Rank r's images are rows [r*B, (r+1)*B) of a one-process batch of W*B: same crops too."""
    directory = dataset_dir(built_shards)
    single = batches_of(TrainLoader(directory, 6, TrainCrop(32), workers=0, seed=4))
    for rank in range(3):
        ranked = batches_of(
            TrainLoader(directory, 2, TrainCrop(32), rank=rank, world_size=3, workers=0, seed=4)
        )
        assert len(ranked) == len(single) == 3
        for (images, labels), (all_images, all_labels) in zip(ranked, single):
            assert torch.equal(images, all_images[2 * rank : 2 * rank + 2])
            assert torch.equal(labels, all_labels[2 * rank : 2 * rank + 2])


@pytest.mark.parametrize("store", STORES)
def test_center_val_is_resize_then_center_crop(built_shards, store):
    loader = ValLoader(dataset_dir(built_shards, store, "val"), 5, 64, workers=0)
    batches = batches_of(loader)
    assert [len(labels) for _, labels in batches] == [5, 5, 2]
    records = loader.records
    images = torch.cat([images for images, _ in batches])
    assert torch.cat([labels for _, labels in batches]).tolist() == records.labels.tolist()
    for index in range(len(records)):
        box = center_crop_box(int(records.heights[index]), int(records.widths[index]), 64, 0.875)
        assert torch.equal(images[index], expected_image(records, index, box, 64, 64))


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("rect", [False, True])
def test_val_counts_each_image_once_on_every_rank_count(built_shards, world_size, rect):
    """18 train records as a val set: uneven batches of 4, every rank the same number of steps."""
    directory = dataset_dir(built_shards)
    seen, lengths = [], set()
    for rank in range(world_size):
        loader = ValLoader(directory, 4, 48, rank=rank, world_size=world_size, workers=0, rect=rect)
        batches = batches_of(loader)
        plans = list(loader.plans())
        lengths.add(len(batches))
        assert len(batches) == len(loader) == len(plans)
        for (images, labels), plan in zip(batches, plans):
            assert len(images) == len(labels) == len(plan.batch.indices) and images.shape[1] == 3
            assert labels.tolist() == loader.records.labels[plan.batch.indices].tolist()
            seen += plan.batch.indices.tolist()
    assert lengths == {-(-5 // world_size)} and sorted(seen) == list(range(18))


def test_rect_val_batches_share_a_shape_from_their_mean_ratio(built_shards):
    loader = ValLoader(dataset_dir(built_shards, "msgpack"), 4, 64, workers=0, rect=True)
    records = loader.records
    shapes = set()
    for (images, _), plan in zip(batches_of(loader), loader.plans()):
        target = rect_target_size(64, float(np.mean(records.aspect_ratios()[plan.batch.indices])))
        assert images.shape[2:] == target
        shapes.add(target)
        for slot, index in enumerate(plan.batch.indices.tolist()):
            box = rect_crop_box(int(records.heights[index]), int(records.widths[index]), *target)
            assert torch.equal(images[slot], expected_image(records, index, box, *target))
    assert len(shapes) > 1  # portrait and landscape batches
    loader.set_crop_size(32)
    assert all(min(images.shape[2:]) == 32 for images, _ in batches_of(loader))


@pytest.mark.parametrize("executor,workers", RUNS)
def test_empty_val_batches_have_zero_images(built_shards, executor, workers):
    loader = ValLoader(
        dataset_dir(built_shards, split="val"),
        12,
        32,
        rank=1,
        world_size=2,
        workers=workers,
        executor=executor,
    )
    ((images, labels),) = batches_of(loader)
    assert (
        images.shape == (0, 3, 32, 32) and labels.shape == (0,) and loader.num_images_on_rank == 0
    )


def test_bad_paths_and_arguments(built_shards, tmp_path):
    with pytest.raises(DatasetError, match="no such dataset directory"):
        TrainLoader(tmp_path / "train-160", 4, TrainCrop(32))
    with pytest.raises(DatasetError, match="no manifest.json"):
        ValLoader(tmp_path, 4, 32)
    with pytest.raises(ValueError, match="decode"):
        TrainLoader(dataset_dir(built_shards), 4, TrainCrop(32), decode="dali")
    with pytest.raises(ValueError, match="fill no global batch"):
        TrainLoader(dataset_dir(built_shards), 10, TrainCrop(32), world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            TrainLoader(dataset_dir(built_shards), 4, TrainCrop(32), decode="gpu")


@pytest.mark.parametrize(
    "store,executor,workers",
    [
        ("lmdb", "threads", 0),
        ("msgpack", "threads", 2),
        ("lmdb", "processes", 0),
        ("msgpack", "processes", 1),
    ],
)
def test_corrupt_record_raises_one_error_naming_it(
    built_shards, tmp_path, store, executor, workers
):
    """The batches before the bad record's come out whole; then one DatasetError naming the
    dataset, the record and its source file."""
    source = dataset_dir(built_shards, store)
    directory = damaged_copy(source, tmp_path / "train-160")
    loader = TrainLoader(directory, 2, TrainCrop(32), workers=workers, executor=executor)
    corrupt_record(directory, bytes(loader.records.view(11)))
    plans = list(loader.plans())
    bad_batch = next(
        number for number, plan in enumerate(plans) if 11 in plan.batch.indices.tolist()
    )
    delivered = []
    with pytest.raises(DatasetError) as raised:
        for images, _ in loader:
            delivered.append(images.clone())
    message = str(raised.value)
    assert message.startswith(f"{directory}: record 11 ({loader.records.name(11)}): cannot decode")
    assert "Traceback" not in message and "\n" not in message
    if executor == "threads" or workers == 0:  # in order; worker processes may fail first
        assert len(delivered) == bad_batch
    pids = loader.worker_pids()
    import gc

    gc.disable()  # `raised` keeps the failed iteration's frame: close() must not need the collector
    try:
        loader.close()
        assert stopped_within(pids, 10), pids
    finally:
        gc.enable()


@pytest.mark.parametrize("executor,workers", [("threads", 2), ("processes", 1)])
def test_gpu_decode_mode_on_cpu_matches_cpu_decode(built_shards, executor, workers):
    """decode="gpu" with device="cpu" runs the nvJPEG code path through torchvision's CPU decoder;
    the workers (threads by default) only gather each batch's bytes."""
    cpu = batches_of(TrainLoader(dataset_dir(built_shards), 6, TrainCrop(40), workers=0))
    loader = TrainLoader(
        dataset_dir(built_shards),
        6,
        TrainCrop(40),
        workers=workers,
        decode="gpu",
        device="cpu",
        executor=executor,
    )
    gpu_path = batches_of(loader)
    assert (
        len(cpu) == len(gpu_path) > 0
        and TrainLoader(
            dataset_dir(built_shards), 6, TrainCrop(40), decode="gpu", device="cpu"
        ).executor
        == "threads"
    )
    records, full_scale = loader.records, 0
    for (images, labels), (other_images, other_labels), plan in zip(cpu, gpu_path, loader.plans()):
        assert torch.equal(labels, other_labels)
        boxes, _ = plan.boxes_and_flips(records.heights, records.widths)
        for image, other, box in zip(images, other_images, boxes.tolist()):
            difference = (image.int() - other.int()).abs().float().mean()
            # nvJPEG's path decodes every image at full size; the CPU's takes a large box from
            # a 1/2 DCT-scaled decode (a different downscale of these textured samples)
            if dct_scale_for_box(box[2], box[3], 40, 40) == (1, 1):
                full_scale += 1
                assert difference < 1.0
            else:
                assert difference < 6.0
    assert full_scale > 0


@pytest.mark.gpu
def test_gpu_decode_on_cuda(built_shards):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loader = TrainLoader(dataset_dir(built_shards), 6, TrainCrop(40), workers=0, decode="gpu")
    cpu = batches_of(TrainLoader(dataset_dir(built_shards), 6, TrainCrop(40), workers=0))
    on_gpu = batches_of(loader)
    assert len(on_gpu) == len(cpu) > 0
    for (images, labels), (cpu_images, cpu_labels) in zip(on_gpu, cpu):
        assert images.is_cuda and images.dtype == torch.uint8
        assert (images.cpu().int() - cpu_images.int()).abs().float().mean() < 2.0


@pytest.mark.gpu
def test_cpu_batches_are_pinned_with_cuda(built_shards):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for executor, workers in RUNS:
        images, _ = next(
            iter(
                TrainLoader(
                    dataset_dir(built_shards), 4, TrainCrop(32), workers=workers, executor=executor
                )
            )
        )
        assert images.is_pinned(), (executor, workers)


def test_dropping_a_loader_stops_its_worker_processes_at_once(built_shards):
    """No reference cycle through the DataLoader: a phase that switches shard directories frees
    the old loader's persistent workers without waiting for the garbage collector."""
    import gc
    import time

    alive = process_alive
    gc.disable()
    try:
        loader = TrainLoader(
            dataset_dir(built_shards), 2, TrainCrop(32), workers=2, executor="processes"
        )
        for _ in loader:
            break
        deadline = (
            time.monotonic() + 30
        )  # a worker records its PID once started: maybe after batch 1
        while len(loader.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = loader.worker_pids()
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        del loader
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids)
    finally:
        gc.enable()


def test_gpu_decode_mode_handles_empty_padding_val_batches(built_shards):
    """Under DDP some ranks get empty validation batches; the GPU-decode path must pass them on."""
    loader = ValLoader(
        dataset_dir(built_shards, "lmdb", "val"),
        5,
        32,
        rank=1,
        world_size=2,
        workers=0,
        decode="gpu",
        device="cpu",
    )
    batches = batches_of(loader)
    assert len(batches) == len(loader) and batches[-1][0].shape == (0, 3, 32, 32)
    assert sum(len(labels) for _, labels in batches) == loader.num_images_on_rank

"""train.data.prefetch (device-side normalize, one batch ahead) and train.bench.loader (img/s,
worker memory): same API on CPU as on CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.loader_shards import dataset_dir
from train.bench.loader import bench_loader, process_memory_mb
from train.data.constants import IMAGENET_MEAN, IMAGENET_STD
from train.data.crops import TrainCrop
from train.data.loaders import TrainLoader, ValLoader
from train.data.prefetch import DevicePrefetcher, normalize


def test_normalize_is_imagenet_standardization():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    x = normalize(images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (images.float() / 255 - mean) / std, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert normalize(images, torch.bfloat16, channels_last=False).dtype == torch.bfloat16
    assert normalize(images[:0]).shape == (0, 3, 5, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefetcher_on_cpu_yields_normalized_batches(built_shards, dtype):
    loader = TrainLoader(dataset_dir(built_shards), 4, TrainCrop(32), workers=0)
    prefetcher = DevicePrefetcher(loader, torch.device("cpu"), dtype)
    batches = list(prefetcher)
    assert len(batches) == len(prefetcher) == 4
    raw = list(loader)
    assert len(raw) == len(batches)
    for (x, labels), (images, raw_labels) in zip(batches, raw):
        assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(x.float(), normalize(images), atol=0.05) and torch.equal(
            labels, raw_labels
        )
    assert prefetcher.data_wait_seconds > 0


def test_prefetcher_passes_empty_val_batches(built_shards):
    loader = ValLoader(
        dataset_dir(built_shards, split="val"), 12, 32, rank=1, world_size=2, workers=0
    )
    ((x, labels),) = list(DevicePrefetcher(loader, torch.device("cpu")))
    assert x.shape == (0, 3, 32, 32) and labels.shape == (0,)


@pytest.mark.gpu
def test_prefetcher_on_cuda(built_shards):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loader = TrainLoader(dataset_dir(built_shards), 4, TrainCrop(32), workers=1)
    expected = [normalize(images).to(torch.bfloat16) for images, _ in loader]
    prefetched = list(DevicePrefetcher(loader, torch.device("cuda"), torch.bfloat16))
    assert len(prefetched) == len(expected) > 0
    for (x, labels), reference in zip(prefetched, expected):
        assert x.is_cuda and labels.is_cuda and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(x.float().cpu(), reference.float(), atol=0.02)
    loader.close()


def test_bench_loader_reports_rate_and_worker_memory(built_shards):
    result = bench_loader(dataset_dir(built_shards), 32, 4, 1, 6, warmup_batches=2)
    assert result["images"] == 24 and result["img_per_s"] > 0 and result["seconds"] > 0
    assert len(result["worker_rss_mb"]) == 1 and result["worker_rss_mb"][0] > 0
    assert len(result["worker_uss_mb"]) == 1 and isinstance(result["machine"], str)
    val = bench_loader(
        dataset_dir(built_shards, split="val"), 32, 5, 0, 4, val=True, rect=True, warmup_batches=1
    )
    assert val["images"] > 0 and len(val["worker_rss_mb"]) == 1  # 0 workers: the main process


def test_process_memory_has_rss_and_private_sizes():
    import os

    memory = process_memory_mb(os.getpid())
    assert memory["rss"] >= memory["uss"] >= memory["private_dirty"] > 0

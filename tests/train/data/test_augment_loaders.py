"""color_jitter, random_erasing and repeat_aug through the real loaders and the prefetcher: the
same (seed, epoch, position) gives the same augmented batch under any worker kind and count, after
a resume mid-epoch, and with decode="gpu" (run on the CPU here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.loader_shards import dataset_dir
from train.data.augment import Augmentation
from train.data.color import JITTER_DRAWS, JITTER_FIRST_DRAW, color_jitter_, jitter_factors
from train.data.crops import TrainCrop
from train.data.loaders import TrainLoader
from train.data.prefetch import DevicePrefetcher, normalize

AUGMENTATION = Augmentation(color_jitter=0.4, random_erasing=0.5, repeat_aug=2)
BATCH, CROP = 4, 40  # 18 train images: 4 batches per epoch


def make_loader(directory, augmentation=AUGMENTATION, **kwargs):
    return TrainLoader(
        directory, BATCH, TrainCrop(CROP), seed=3, **augmentation.loader_kwargs(), **kwargs
    )


def float_batches(loader, epoch=1, start_batch=0):
    try:
        loader.set_epoch(epoch, start_batch)
        return [(x.clone(), labels.clone()) for x, labels in DevicePrefetcher(loader, "cpu")]
    finally:
        loader.close()


@pytest.mark.parametrize("executor,workers", [("threads", 2), ("processes", 2)])
def test_same_batches_under_any_workers_and_after_a_resume(built_shards, executor, workers):
    directory = dataset_dir(built_shards)
    reference = float_batches(make_loader(directory, workers=0, executor="threads"))
    other = float_batches(make_loader(directory, workers=workers, executor=executor))
    resumed = float_batches(make_loader(directory, workers=workers, executor=executor), 1, 2)
    assert len(reference) == len(other) == 4 and len(resumed) == 2
    for (x_a, labels_a), (x_b, labels_b) in zip(reference, other):
        assert torch.equal(x_a, x_b) and torch.equal(labels_a, labels_b)
    for (x_a, _), (x_b, _) in zip(reference[2:], resumed):
        assert torch.equal(x_a, x_b)


def test_prefetched_batch_is_jittered_then_erased(built_shards):
    """x = normalize(color_jitter(plain crop)) with exactly the plan's boxes zeroed."""
    directory = dataset_dir(built_shards)
    plain_loader = make_loader(directory, Augmentation(repeat_aug=2), workers=0)
    plain_loader.set_epoch(1)
    plain = [images.clone() for images, _ in plain_loader]
    plain_loader.close()
    loader = make_loader(directory, workers=0)
    loader.set_epoch(1)
    plans = list(loader.plans())
    augmented = float_batches(loader)
    erased_images = 0
    for images, plan, (x, _) in zip(plain, plans, augmented):
        keys = plan.sample_seeds()
        factors, orders = jitter_factors(0.4, keys.uniforms(JITTER_FIRST_DRAW, JITTER_DRAWS))
        expected = images.clone()
        color_jitter_(expected, factors, orders)
        assert not torch.equal(expected, images)
        expected = normalize(expected)
        boxes = plan.device_ops().erase_boxes
        for slot, (top, left, height, width) in enumerate(boxes.tolist()):
            expected[slot, :, top : top + height, left : left + width] = 0
            erased_images += height > 0
        assert torch.equal(x, expected)
    assert 0 < erased_images < len(plans) * BATCH  # p = 0.5 over 16 images


def test_decode_gpu_path_applies_the_same_ops(built_shards):
    """decode="gpu" (the nvJPEG path, on torchvision's CPU decoder here): the same DeviceOps
    handed to the prefetcher, auto_augment applied after the decode (it was skipped before)."""
    directory = dataset_dir(built_shards)
    gpu = dict(workers=0, decode="gpu", device="cpu")
    batches = {}
    for name, augmentation in (
        ("plain", Augmentation()),
        ("ta_wide", Augmentation(auto_augment="ta_wide")),
        ("erase", Augmentation(color_jitter=0.4, random_erasing=1.0)),
    ):
        loader = make_loader(directory, augmentation, **gpu)
        loader.set_epoch(1)
        batches[name] = (list(loader.plans()), [tuple(b) for b in loader])
        loader.close()
    plans, erased = batches["erase"]
    for plan, (images, _, ops), (plain, _) in zip(plans, erased, batches["plain"][1]):
        expected = plan.device_ops()
        assert torch.equal(images, plain)  # the jitter waits for the prefetcher
        assert np.array_equal(ops.erase_boxes, expected.erase_boxes)
        assert np.array_equal(ops.jitter_factors, expected.jitter_factors)
        assert (ops.erase_boxes[:, 2] > 0).all()
    changed = [
        not torch.equal(a[0], b[0]) for a, b in zip(batches["ta_wide"][1], batches["plain"][1])
    ]
    assert any(changed)


def test_worker_ops_and_loader_arguments():
    assert Augmentation().worker_ops() is None
    assert Augmentation(color_jitter=0.3, random_erasing=0.1).worker_ops() is None
    assert type(Augmentation(auto_augment="ra").worker_ops()).__name__ == "AutoAugment"
    with pytest.raises(ValueError, match="random_erasing"):
        TrainLoader(None, 4, TrainCrop(8), random_erasing=1.5)
    with pytest.raises(ValueError, match="color_jitter"):
        TrainLoader(None, 4, TrainCrop(8), color_jitter=-0.1)


def test_the_recipe_reaches_the_train_loader(built_shards):
    """train.run.shards: the recipe's keys become the loader's uint8 ops, erasing and sampler."""
    from train.plan.config import Recipe
    from train.run.shards import ShardData, train_augmentation

    recipe = Recipe.from_mapping({"color_jitter": 0.4, "random_erasing": 0.25, "repeat_aug": 3})
    augmentation = train_augmentation(recipe)
    assert augmentation == Augmentation(None, 0.4, 0.25, 3)
    loader = ShardData(built_shards / "lmdb").train_loader(
        "train-160",
        BATCH,
        TrainCrop(CROP),
        rank=0,
        world_size=1,
        seed=3,
        workers=0,
        decode="cpu",
        device=None,
        augment=augmentation,
    )
    try:
        assert loader.sampler.repeat_aug == 3 and loader.random_erasing == 0.25
        assert loader.color_jitter == 0.4 and loader.augment is None
        loader.set_epoch(0)
        images, labels, ops = next(iter(loader))
        assert ops.erase_boxes.shape == (BATCH, 4) and ops.jitter_factors.shape == (BATCH, 3)
        assert images.shape == (BATCH, 3, CROP, CROP)
    finally:
        loader.close()


def test_bench_loader_measures_the_augmentations(built_shards):
    from tests.train.test_cli import error_line, invoke
    from train.bench.loader import bench_loader

    directory = dataset_dir(built_shards)
    result = bench_loader(
        directory,
        32,
        4,
        0,
        2,
        warmup_batches=0,
        augment=Augmentation(color_jitter=0.4, random_erasing=0.5, repeat_aug=2),
        prefetch=True,
    )
    assert result["color_jitter"] == 0.4 and result["random_erasing"] == 0.5
    assert result["repeat_aug"] == 2 and result["prefetch"] and result["images"] == 8
    base = ["bench-loader", "--data", directory, "--crop-size", "32", "--batch-size", "4"]
    for extra, expected in (
        (["--random-erasing", "1.5", "--prefetch"], "random_erasing"),
        (["--color-jitter", "-1", "--prefetch"], "color_jitter"),
        (["--repeat-aug", "0"], "repeat_aug"),
        (["--repeat-aug", "2", "--val"], "drop --val"),
    ):
        assert expected in error_line(invoke(*base, "--batches", "1", *extra)), extra


@pytest.mark.gpu
def test_on_cuda_the_same_augmentations(built_shards):
    """CUDA: jitter after nvJPEG (decode="gpu") and erasing by one mask in the prefetcher: the
    erased boxes exactly the plan's, the jitter within a level of the CPU's on the same decoded
    crops (fused multiply-adds may round a blend the other way)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    directory = dataset_dir(built_shards)
    gpu = dict(workers=0, decode="gpu", device="cuda")
    plain_loader = make_loader(directory, Augmentation(repeat_aug=2), **gpu)
    plain_loader.set_epoch(1)
    plain = [images.cpu() for images, _ in plain_loader]
    plain_loader.close()
    loader = make_loader(directory, **gpu)
    loader.set_epoch(1)
    plans = list(loader.plans())
    on_cuda = [x.cpu() for x, _ in DevicePrefetcher(loader, torch.device("cuda"))]
    loader.close()
    assert len(plain) == len(on_cuda) == 4
    for images, plan, x in zip(plain, plans, on_cuda):
        keys = plan.sample_seeds()
        factors, orders = jitter_factors(0.4, keys.uniforms(JITTER_FIRST_DRAW, JITTER_DRAWS))
        color_jitter_(images, factors, orders)
        expected = normalize(images)
        for slot, (top, left, height, width) in enumerate(plan.device_ops().erase_boxes.tolist()):
            expected[slot, :, top : top + height, left : left + width] = 0
        assert torch.equal(expected == 0, x == 0)
        assert (expected - x).abs().max() <= 1.01 / (255 * 0.224)  # one level of 255

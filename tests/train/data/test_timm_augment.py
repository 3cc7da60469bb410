"""auto_augment "timm:<config>": timm's own transform per image, bit-exact against timm applied
directly (with the hparams timm's transforms_factory gives), seeded per sample, the caller's RNGs
untouched, refused in one line at the recipe check, and through the real loaders."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.loader_shards import dataset_dir
from train.data.augment import Augmentation
from train.data.auto_augment import torch_seed
from train.data.crops import TrainCrop
from train.data.loaders import TrainLoader
from train.data.timm_augment import TimmAugment, numpy_seed
from train.errors import RecipeError
from train.plan.config import Recipe

RSB_A3 = "rand-m6-mstd0.5-inc1"
SEEDS = [5, 17, 2**100 + 3, 2**64 - 1]


def random_images(num_images: int, crop_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (num_images, 3, crop_size, crop_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def timm_direct(images: torch.Tensor, config: str, seeds) -> torch.Tensor:
    """timm's transform as timm's train.py builds it (create_transform, its default
    --train-interpolation random), applied to PIL images after seeding both of timm's RNGs."""
    from timm.data import create_transform

    crop_size = images.shape[-1]
    _, augment, _ = create_transform(
        crop_size, is_training=True, auto_augment=config, interpolation="random", separate=True
    )
    out = []
    for image, seed in zip(images, seeds):
        random.seed(torch_seed(seed))
        np.random.seed(numpy_seed(torch_seed(seed)))
        pil = Image.fromarray(image.permute(1, 2, 0).numpy().copy())
        out.append(torch.from_numpy(np.array(augment(pil))).permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("config", [RSB_A3, "original-mstd0.5", "v0"])
@pytest.mark.parametrize("crop_size", [40, 64])
def test_equals_timm_applied_directly(config, crop_size):
    images = random_images(len(SEEDS), crop_size)
    expected = timm_direct(images, config, SEEDS)
    TimmAugment(f"timm:{config}")(images, SEEDS)
    assert torch.equal(images, expected)
    assert not torch.equal(images, random_images(len(SEEDS), crop_size))


def test_per_sample_seed_not_batch_composition():
    augment = TimmAugment(f"timm:{RSB_A3}")
    whole = random_images(4, 48)
    part = whole[[3, 1]].clone()
    augment(whole, SEEDS)
    augment(part, [SEEDS[3], SEEDS[1]])
    assert torch.equal(part, whole[[3, 1]])
    again = random_images(4, 48)
    augment(again, SEEDS)
    assert torch.equal(again, whole)


def test_the_callers_random_state_is_untouched():
    random.seed(11)
    np.random.seed(12)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    TimmAugment(f"timm:{RSB_A3}")(random_images(3, 32), SEEDS[:3])
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(after, numpy_state))


@pytest.mark.parametrize(
    "value,reason",
    [
        ("timm:rand-m6-q1", "timm refuses it: Unknown RandAugment config section"),
        ("timm:rand-m6x", "timm refuses it: invalid literal for int"),
        ("timm:augmix-m3", "a timm config must start with one of rand, original"),
        ("rand-m6", "must be one of ra, ta_wide, imagenet or timm:<config>"),
    ],
)
def test_bad_string_refused_in_one_line(value, reason):
    with pytest.raises(RecipeError, match=f"recipe key 'auto_augment': {reason}") as caught:
        Recipe.from_mapping({"auto_augment": value})
    assert "\n" not in str(caught.value)


def test_refused_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.data.auto_augment", None)  # import fails
    with pytest.raises(RecipeError, match="need timm .pip install 'shardtrain.timm.'") as caught:
        Recipe.from_mapping({"auto_augment": f"timm:{RSB_A3}"})
    assert "\n" not in str(caught.value)
    assert Recipe.from_mapping({"auto_augment": "ra"}).auto_augment == "ra"


def loader_batches(directory, augment, **kwargs):
    loader = TrainLoader(directory, 6, TrainCrop(48), seed=3, augment=augment, **kwargs)
    try:
        loader.set_epoch(1)
        plans = list(loader.plans())
        return plans, [batch[0].clone() for batch in loader]
    finally:
        loader.close()


def test_through_the_loaders(built_shards):
    """Worker processes give the in-process batches; decode="gpu" (torchvision's CPU decoder
    here) gives timm's transform of its plain batches, from the plan's sample seeds."""
    directory = dataset_dir(built_shards)
    augment = Augmentation(auto_augment=f"timm:{RSB_A3}").worker_ops()
    assert augment.name == f"timm:{RSB_A3}"  # what tests/train/plan/test_recipes.py reads
    _, plain = loader_batches(directory, None, workers=0)
    _, inline = loader_batches(directory, augment, workers=0, executor="threads")
    _, processes = loader_batches(directory, augment, workers=2, executor="processes")
    assert len(inline) == 3 and all(map(torch.equal, inline, processes))
    assert not all(map(torch.equal, inline, plain))
    gpu = dict(workers=0, decode="gpu", device="cpu")
    plans, gpu_plain = loader_batches(directory, None, **gpu)
    _, gpu_augmented = loader_batches(directory, augment, **gpu)
    for plan, images, augmented in zip(plans, gpu_plain, gpu_augmented):
        augment(images, plan.sample_seeds())
        assert torch.equal(images, augmented)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_batch_makes_a_round_trip_to_the_cpu():
    augment = TimmAugment(f"timm:{RSB_A3}")
    on_cpu, on_gpu = random_images(4, 48), random_images(4, 48).cuda()
    augment(on_cpu, SEEDS)
    augment(on_gpu, SEEDS)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)

"""train.data.color: the vectorised ColorJitter against torchvision v2's functional ops for given
factors and orders, its factor range (timm's --color-jitter s), and its per-sample draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from train.data.color import JITTER_DRAWS, JITTER_FIRST_DRAW, ORDERS, color_jitter_, jitter_factors
from train.data.samplers import SampleKeys

TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def photo_batch(num_images: int, seed: int = 0, size: int = 24) -> torch.Tensor:
    """uint8 NCHW: gradients, noise and saturated corners (clamping and grayscale both matter)."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = torch.stack([xx * 10, yy * 10, (xx + yy) * 5]).float()
    noise = torch.randint(-40, 41, (num_images, 3, size, size), generator=generator)
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    images[:, :, :3, :3] = 255
    images[:, :, -3:, -3:] = 0
    return images


def assert_same_images(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Bit for bit with torch 2.13 here; allow another torch's CPU kernels to round a blend the
    other way (one level, rarely). A wrong op, factor, order or grayscale is off by many levels
    in many pixels."""
    difference = (ours.int() - theirs.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3


def torchvision_jitter(image: torch.Tensor, factors, order) -> torch.Tensor:
    for op in order:
        image = TV_OPS[op](image, float(factors[op]))
    return image


@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision_functional_ops(channels_last):
    images = photo_batch(12)
    if channels_last:  # the loader's batches are NHWC memory viewed as NCHW
        images = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    rng = np.random.default_rng(3)
    factors = rng.uniform(0.0, 2.5, (12, 3)).astype(np.float32)
    orders = np.arange(12) % len(ORDERS)  # every order, twice
    expected = torch.stack(
        [torchvision_jitter(images[i], factors[i], ORDERS[orders[i]]) for i in range(12)]
    )
    color_jitter_(images, factors, orders)
    assert_same_images(images, expected)


def test_the_order_matters_and_is_honoured():
    images = photo_batch(1, seed=5)
    factors = np.array([[1.8, 0.3, 1.9]], dtype=np.float32)
    results = []
    for order_index in range(len(ORDERS)):
        out = images.clone()
        color_jitter_(out, factors, np.array([order_index]))
        assert_same_images(out[0], torchvision_jitter(images[0], factors[0], ORDERS[order_index]))
        results.append(out)
    assert len({tuple(r.flatten().tolist()) for r in results}) > 1


def test_factor_range_and_order_are_uniform():
    rng = np.random.default_rng(0)
    factors, orders = jitter_factors(0.4, rng.random((60000, JITTER_DRAWS)))
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert abs(factors.mean() - 1.0) < 0.005 and factors.min() < 0.601 and factors.max() > 1.399
    counts = np.bincount(orders, minlength=len(ORDERS)) / len(orders)
    assert np.all(np.abs(counts - 1 / 6) < 0.01)  # binomial sd ~0.0015: 6 sd
    strong, _ = jitter_factors(1.5, rng.random((1000, JITTER_DRAWS)))
    assert strong.min() >= 0.0 and strong.max() <= 2.5  # max(0, 1 - s)


def test_draws_come_from_the_sample_keys():
    """A plan's jitter is its samples' draws: the same positions give the same factors in any
    batch they sit in, another seed others."""
    from train.data.crops import TrainCrop
    from train.data.samplers import TrainBatchIndices, TrainPlan

    def ops(seed, positions):
        positions = np.asarray(positions)
        batch = TrainBatchIndices(1, 0, positions % 5, positions)
        return TrainPlan(batch, TrainCrop(16), seed, color_jitter=0.4).device_ops()

    whole, part = ops(2, [40, 41, 42, 7, 8, 9]), ops(2, [7, 8, 9])
    assert np.array_equal(whole.jitter_factors[3:], part.jitter_factors)
    assert np.array_equal(whole.jitter_orders[3:], part.jitter_orders)
    keys = SampleKeys(2, 1, np.array([40, 41, 42, 7, 8, 9]))
    factors, orders = jitter_factors(0.4, keys.uniforms(JITTER_FIRST_DRAW, JITTER_DRAWS))
    assert np.array_equal(whole.jitter_factors, factors)
    assert np.array_equal(whole.jitter_orders, orders)
    assert not np.array_equal(ops(3, [40, 41, 42]).jitter_factors, whole.jitter_factors[:3])
    assert whole.erase_boxes is None and ops(2, [1]).jitter_factors.shape == (1, 3)

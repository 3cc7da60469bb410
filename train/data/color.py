"""ColorJitter (brightness, contrast, saturation; no hue) on a uint8 batch, on any device:
torchvision v2's functional ops, vectorised over the batch with per-image factors and a per-image
random order (train.data.device_ops runs it in the prefetcher)."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from train.data.erasing import ERASE_DRAWS, ERASE_FIRST_DRAW

# Draw slots (train.data.samplers.sample_uniforms) after random erasing's: the three factors,
# then the order.
JITTER_FIRST_DRAW = ERASE_FIRST_DRAW + ERASE_DRAWS
JITTER_DRAWS = 4
OPS = ("brightness", "contrast", "saturation")
ORDERS = tuple(itertools.permutations(range(len(OPS))))  # torchvision draws randperm per call
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def jitter_factors(strength: float, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) float factors, each uniform in [max(0, 1 - s), 1 + s] (timm's --color-jitter s),
    and (N,) orders (indices into ORDERS), from each image's JITTER_DRAWS uniforms."""
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if uniforms.ndim != 2 or uniforms.shape[1] != JITTER_DRAWS:
        raise ValueError(f"need uniforms of shape (N, {JITTER_DRAWS}), got {uniforms.shape}")
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    factors = low + (high - low) * uniforms[:, :3]
    orders = np.minimum((uniforms[:, 3] * len(ORDERS)).astype(np.int64), len(ORDERS) - 1)
    return factors, orders


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grayscale of float RGB levels, floored as torchvision does for uint8."""
    red, green, blue = x.unbind(dim=1)
    gray = red.mul(GRAY_WEIGHTS[0]).add_(green, alpha=GRAY_WEIGHTS[1])
    return gray.add_(blue, alpha=GRAY_WEIGHTS[2]).unsqueeze(1).floor_()


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor, complement: torch.Tensor):
    """torchvision's _blend for uint8 images, in place on float levels: x * f + other * (1 - f),
    clamped, then truncated to a level. addcmul with 1 - f rounded from float64 reproduces
    torchvision's `add_(other, alpha=1 - f)` bit for bit on the CPU (a plain multiply-add
    differs by a level in ~0.04% of pixels)."""
    return x.mul_(factor).addcmul_(other, complement).clamp_(0, 255).floor_()


def adjust_(x: torch.Tensor, op: int, factor: torch.Tensor, complement: torch.Tensor):
    """One op, in place, on float levels (N, 3, H, W); per-image factors and 1 - factors
    (N, 1, 1, 1)."""
    if OPS[op] == "brightness":
        return x.mul_(factor).clamp_(0, 255).floor_()
    if OPS[op] == "contrast":  # blend with the image's mean grayscale
        mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
        return _blend(x, mean, factor, complement)
    return _blend(x, _gray(x), factor, complement)  # saturation: each pixel's grayscale


def color_jitter_(images: torch.Tensor, factors, orders) -> None:
    """Jitter a uint8 NCHW batch in place: image i gets factors[i] (brightness, contrast,
    saturation; float64 or float32 (N, 3)) in the order ORDERS[orders[i]]. One float pass per
    order group, not per image."""
    orders = torch.as_tensor(np.asarray(orders), dtype=torch.int64)
    factors = torch.as_tensor(np.asarray(factors, dtype=np.float32))
    complements = (1.0 - factors.double()).float()
    # non_blocking: on CUDA no host wait for the side stream (small pageable copies are staged)
    factors = factors.to(images.device, non_blocking=True)
    complements = complements.to(images.device, non_blocking=True)
    for order_index, order in enumerate(ORDERS):
        rows = torch.nonzero(orders == order_index).flatten()
        if len(rows) == 0:
            continue
        rows = rows.to(images.device, non_blocking=True)
        x = images.index_select(0, rows).float()
        group_factors = factors.index_select(0, rows)[:, :, None, None, None]
        group_complements = complements.index_select(0, rows)[:, :, None, None, None]
        for op in order:
            adjust_(x, op, group_factors[:, op], group_complements[:, op])
        images.index_copy_(0, rows, x.to(torch.uint8))

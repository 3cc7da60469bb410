"""Random erasing (torchvision v2 RandomErasing, value 0 after normalisation): boxes from each
sample's counter-based draws in the workers, one mask over the float batch in the prefetcher."""

from __future__ import annotations

import math

import numpy as np

from train.data.crops import CROP_DRAWS

ERASE_SCALE = (0.02, 0.33)  # fraction of the crop's area (torchvision's defaults)
ERASE_RATIO = (0.3, 3.3)  # height / width of the box
ERASE_ATTEMPTS = 10
# Draw slots (train.data.samplers.sample_uniforms): after the crop's and the flip's, one for
# "erase or not", then per attempt (area fraction, log aspect ratio), then the box's top and left.
ERASE_FIRST_DRAW = CROP_DRAWS + 1
ERASE_DRAWS = 1 + 2 * ERASE_ATTEMPTS + 2


def erase_boxes(out_size: tuple[int, int], uniforms: np.ndarray, probability: float) -> np.ndarray:
    """(N, 4) int64 (top, left, height, width) boxes for N crops of `out_size`, torchvision's
    RandomErasing.make_params per row of ERASE_DRAWS `uniforms`; height = width = 0 where the
    image is not erased (the draw said no, or no attempt fitted)."""
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if uniforms.ndim != 2 or uniforms.shape[1] != ERASE_DRAWS:
        raise ValueError(f"need uniforms of shape (N, {ERASE_DRAWS}), got {uniforms.shape}")
    height, width = out_size
    area = float(height * width)
    erase_area = area * (
        ERASE_SCALE[0]
        + (ERASE_SCALE[1] - ERASE_SCALE[0]) * uniforms[:, 1 : 1 + 2 * ERASE_ATTEMPTS : 2]
    )
    log_low, log_high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = np.exp(log_low + (log_high - log_low) * uniforms[:, 2 : 2 + 2 * ERASE_ATTEMPTS : 2])
    box_heights = np.rint(np.sqrt(erase_area * aspect)).astype(np.int64)
    box_widths = np.rint(np.sqrt(erase_area / aspect)).astype(np.int64)
    fits = (box_heights < height) & (box_widths < width)  # torchvision's test: strictly inside
    rows, attempt = np.arange(len(uniforms)), fits.argmax(axis=1)
    box_heights, box_widths = box_heights[rows, attempt], box_widths[rows, attempt]
    # randint(0, n + 1) from one draw: floor(u * (n + 1)) <= n for u < 1
    tops = np.floor(uniforms[:, -2] * (height - box_heights + 1)).astype(np.int64)
    lefts = np.floor(uniforms[:, -1] * (width - box_widths + 1)).astype(np.int64)
    erased = (uniforms[:, 0] < probability) & fits.any(axis=1)
    boxes = np.stack([tops, lefts, box_heights, box_widths], axis=1)
    boxes[~erased] = 0
    return boxes


def erase(x, boxes, masked: bool | None = None):
    """Zero each image's box of a float NCHW batch `x` (any device, any memory format), in place;
    `boxes` an (N, 4) integer CPU tensor as erase_boxes makes. Returns x.

    `masked` (default: on CUDA) builds one (N, 1, H, W) mask from the boxes and fills in one
    kernel, no per-image launches; on the CPU zeroing each erased box's slice touches only those
    pixels, ~300x cheaper than the mask over the whole batch (docs/BENCHMARKS.md)."""
    import torch

    if masked is None:
        masked = x.device.type == "cuda"
    if not masked:
        for slot, (top, left, height, width) in enumerate(boxes.tolist()):
            if height:
                x[slot, :, top : top + height, left : left + width] = 0
        return x
    boxes = boxes.to(x.device, non_blocking=True)
    height, width = x.shape[-2:]
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    top, left, box_height, box_width = (boxes[:, i, None] for i in range(4))
    in_rows = (rows >= top) & (rows < top + box_height)  # (N, H)
    in_cols = (cols >= left) & (cols < left + box_width)  # (N, W)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    return x.masked_fill_(mask, 0)

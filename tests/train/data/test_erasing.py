"""train.data.erasing: boxes as torchvision v2 RandomErasing draws them (scale, ratio, attempts,
probability), and the batch mask against torchvision's functional erase."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from train.data.erasing import (
    ERASE_ATTEMPTS,
    ERASE_DRAWS,
    ERASE_RATIO,
    ERASE_SCALE,
    erase,
    erase_boxes,
)


def reference_box(height, width, u, probability):
    """torchvision's RandomErasing.forward + make_params, one image, its random numbers replaced
    by the uniforms `u` (erase or not, then per attempt area and log-ratio, then top and left)."""
    if not u[0] < probability:
        return (0, 0, 0, 0)
    area = height * width
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for attempt in range(ERASE_ATTEMPTS):
        erase_area = area * (
            ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[1 + 2 * attempt]
        )
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[2 + 2 * attempt])
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < height and w < width):
            continue
        return (int(u[-2] * (height - h + 1)), int(u[-1] * (width - w + 1)), h, w)
    return (0, 0, 0, 0)  # torchvision: v is None, the image is returned as it was


@pytest.mark.parametrize("out_size", [(32, 32), (24, 40), (6, 6)])
def test_boxes_follow_torchvisions_algorithm(out_size):
    uniforms = np.random.default_rng(1).random((3000, ERASE_DRAWS))
    boxes = erase_boxes(out_size, uniforms, 0.7)
    expected = [reference_box(*out_size, u, 0.7) for u in uniforms]
    assert boxes.tolist() == [list(box) for box in expected]


def test_box_distribution():
    height = width = 224
    uniforms = np.random.default_rng(2).random((20000, ERASE_DRAWS))
    boxes = erase_boxes((height, width), uniforms, 0.25)
    erased = boxes[:, 2] > 0
    # p: binomial sd sqrt(0.25 * 0.75 / 20000) ~ 0.003; a wrong p (or 1 - p) is off by >= 0.05
    assert abs(erased.mean() - 0.25) < 0.015
    tops, lefts, heights, widths = boxes[erased].T
    fraction = heights * widths / (height * width)
    aspect = heights / widths
    slack = 2 / 224  # rounding h and w to whole pixels
    assert fraction.min() >= ERASE_SCALE[0] - 0.005 and fraction.max() <= ERASE_SCALE[1] + 0.01
    assert fraction.min() < 0.025 and fraction.max() > 0.3  # the whole range is used
    assert aspect.min() >= ERASE_RATIO[0] - slack and aspect.max() <= ERASE_RATIO[1] * (1 + slack)
    assert (aspect < 0.4).any() and (aspect > 2.5).any()
    assert (tops >= 0).all() and (tops + heights <= height).all()
    assert (lefts >= 0).all() and (lefts + widths <= width).all()
    assert tops.min() == 0 and lefts.min() == 0 and (tops + heights).max() == height
    assert not erase_boxes((height, width), uniforms, 0.0).any()
    assert (erase_boxes((height, width), uniforms, 1.0)[:, 2] > 0).mean() > 0.999


@pytest.mark.parametrize("masked", [False, True])  # the CPU's slices, CUDA's one mask
@pytest.mark.parametrize("channels_last", [False, True])
def test_erase_equals_torchvision_erase(channels_last, masked):
    x = torch.randn(4, 3, 10, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([[2, 3, 4, 5], [0, 0, 0, 0], [0, 0, 10, 11], [9, 11, 1, 1]])
    expected = torch.stack(
        [
            TF.erase(x[i], *box.tolist(), v=torch.zeros(3, 1, 1)) if box[2] else x[i]
            for i, box in enumerate(boxes)
        ]
    )
    out = erase(x.clone(), boxes, masked)
    assert torch.equal(out, expected)
    assert int((out == 0).sum()) == 3 * (4 * 5 + 10 * 11 + 1)
    assert torch.equal(erase(x.clone(), torch.zeros(4, 4, dtype=torch.int64), masked), x)


def test_bad_draws_are_refused():
    with pytest.raises(ValueError, match="uniforms of shape"):
        erase_boxes((8, 8), np.zeros((2, ERASE_DRAWS - 1)), 0.5)

"""Crop-box maths (random-resized, center, rect validation) and DCT scale choice; pure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from formats.jpeg import POW2_SCALES, scaled_dim
from train.data.constants import DEFAULT_VAL_CROP_RATIO

Box = tuple[int, int, int, int]  # (top, left, height, width)

DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# libjpeg-turbo's 3/4, 5/8 and 7/8 IDCTs measured slower than full size: power-of-two only
# (the one list lives in formats.jpeg, shared with prep's decode).
POWER_OF_TWO_SCALES = POW2_SCALES
RECT_MULTIPLE = 8  # rect-val long side is rounded down to a multiple of this (imagenet18)
RECT_RESIZE_RATIO = 1.14  # imagenet18: resize shorter side to int(crop_size * 1.14)


def _check_image(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image must be non-empty, got height={height} width={width}")


# --------------------------------------------------------------------------- random resized crop


# Uniform draws one random-resized crop consumes: 10 attempts x (area fraction, log aspect ratio),
# then the box's top and left.
CROP_ATTEMPTS = 10
CROP_DRAWS = 2 * CROP_ATTEMPTS + 2


def random_resized_crop_boxes(
    heights,
    widths,
    uniforms: np.ndarray,
    min_scale: float = 0.08,
    max_scale: float = 1.0,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params`` for many images at once: (N, 4) int64
    boxes, each from its image's own CROP_DRAWS ``uniforms`` (docs/DESIGN.md, crops).
    Arguments are TrainCrop's, checked there."""
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if len(heights) and (heights.min() < 1 or widths.min() < 1):
        raise ValueError("images must be non-empty")
    if uniforms.shape != (len(heights), CROP_DRAWS):
        raise ValueError(
            f"need uniforms of shape ({len(heights)}, {CROP_DRAWS}), got {uniforms.shape}"
        )
    area = (heights * widths).astype(np.float64)[:, None]
    target_area = area * (
        min_scale + (max_scale - min_scale) * uniforms[:, 0 : 2 * CROP_ATTEMPTS : 2]
    )
    log_min, log_max = math.log(ratio[0]), math.log(ratio[1])
    aspect_ratio = np.exp(log_min + (log_max - log_min) * uniforms[:, 1 : 2 * CROP_ATTEMPTS : 2])
    crop_widths = np.rint(np.sqrt(target_area * aspect_ratio)).astype(np.int64)
    crop_heights = np.rint(np.sqrt(target_area / aspect_ratio)).astype(np.int64)
    fits = (
        (crop_widths > 0)
        & (crop_widths <= widths[:, None])
        & (crop_heights > 0)
        & (crop_heights <= heights[:, None])
    )
    rows, attempt = np.arange(len(heights)), fits.argmax(axis=1)
    box_heights, box_widths = crop_heights[rows, attempt], crop_widths[rows, attempt]
    # randint(0, n) inclusive at both ends, from one draw: floor(u * (n + 1)) <= n for u < 1
    tops = np.floor(uniforms[:, -2] * (heights - box_heights + 1)).astype(np.int64)
    lefts = np.floor(uniforms[:, -1] * (widths - box_widths + 1)).astype(np.int64)
    boxes = np.stack([tops, lefts, box_heights, box_widths], axis=1)
    for row in np.flatnonzero(~fits.any(axis=1)).tolist():
        boxes[row] = fallback_crop_box(int(heights[row]), int(widths[row]), ratio)
    return boxes


def fallback_crop_box(height: int, width: int, ratio: tuple[float, float] = DEFAULT_RATIO) -> Box:
    """RandomResizedCrop's fallback: the whole image, trimmed centrally to the ratio range."""
    _check_image(height, width)
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width = width
        crop_height = int(round(crop_width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height = height
        crop_width = int(round(crop_height * max(ratio)))
    else:
        crop_height, crop_width = height, width
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


@dataclass(frozen=True)
class TrainCrop:
    """Per-phase training crop: RandomResizedCrop(crop_size, scale=(min_scale, max_scale), ratio);
    small and immutable, in every batch plan, so a phase changes it without new workers."""

    crop_size: int
    min_scale: float = 0.08
    max_scale: float = 1.0
    ratio: tuple[float, float] = DEFAULT_RATIO

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}"
            )
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"need 0 < ratio[0] <= ratio[1], got {self.ratio}")

    def boxes(self, heights, widths, uniforms: np.ndarray) -> np.ndarray:
        """(N, 4) boxes from each image's CROP_DRAWS uniforms (random_resized_crop_boxes)."""
        return random_resized_crop_boxes(
            heights, widths, uniforms, self.min_scale, self.max_scale, self.ratio
        )


# --------------------------------------------------------------------------- resize + center crop


def resized_size(height: int, width: int, resized_short_side: int) -> tuple[int, int]:
    """(height, width) after torchvision's ``Resize(resized_short_side)``: long side truncated."""
    _check_image(height, width)
    if width <= height:
        return int(resized_short_side * height / width), resized_short_side
    return resized_short_side, int(resized_short_side * width / height)


def resize_center_crop_box(
    height: int, width: int, resized_short_side: int, crop_height: int, crop_width: int
) -> Box:
    """Box in stored coords equal to ``Resize(resized_short_side)`` +
    ``CenterCrop((crop_height, crop_width))``. (more: docs/DESIGN.md)"""
    _check_image(height, width)
    if crop_height < 1 or crop_width < 1:
        raise ValueError(f"crop must be non-empty, got {crop_height}x{crop_width}")
    resized_short_side = max(
        resized_short_side, _short_side_to_cover(height, width, crop_height, crop_width)
    )
    resized_height, resized_width = resized_size(height, width, resized_short_side)
    top_resized = int(round((resized_height - crop_height) / 2.0))
    left_resized = int(round((resized_width - crop_width) / 2.0))
    scale = min(height, width) / resized_short_side
    top, bottom = _map_span(top_resized, crop_height, scale, height)
    left, right = _map_span(left_resized, crop_width, scale, width)
    return top, left, bottom - top, right - left


def _short_side_to_cover(height: int, width: int, crop_height: int, crop_width: int) -> int:
    """Smallest resized short side whose torchvision-resized image contains the crop."""
    short_side = 1
    for axis, (length, crop_length) in enumerate(((height, crop_height), (width, crop_width))):
        guess = max(1, math.ceil(crop_length * min(height, width) / length) - 1)
        while resized_size(height, width, guess)[axis] < crop_length:
            guess += 1
        short_side = max(short_side, guess)
    return short_side


def _map_span(start: int, length: int, scale: float, limit: int) -> tuple[int, int]:
    """Resized span [start, start + length) -> stored [begin, end), edges rounded half up (not
    half-to-even, so equal lengths map to lengths differing by at most one)."""
    begin = min(max(math.floor(start * scale + 0.5), 0), limit - 1)
    end = min(max(math.floor((start + length) * scale + 0.5), begin + 1), limit)
    return begin, end


def center_crop_box(
    height: int, width: int, crop_size: int, crop_ratio: float = DEFAULT_VAL_CROP_RATIO
) -> Box:
    """``Resize(round(crop_size / crop_ratio))`` + ``CenterCrop(crop_size)``, a stored box."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return resize_center_crop_box(
        height, width, round(crop_size / crop_ratio), crop_size, crop_size
    )


# --------------------------------------------------------------------------- rect validation


def rect_target_size(crop_size: int, aspect_ratio: float) -> tuple[int, int]:
    """(target_height, target_width) of a rect-val batch of mean ratio ``aspect_ratio`` (w/h)."""
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    if not aspect_ratio > 0:
        raise ValueError(f"aspect_ratio must be > 0, got {aspect_ratio}")
    stretch = aspect_ratio if aspect_ratio >= 1 else 1 / aspect_ratio
    long_side = math.floor(crop_size * stretch + 1e-9) // RECT_MULTIPLE * RECT_MULTIPLE
    long_side = max(long_side, crop_size)
    return (crop_size, long_side) if aspect_ratio >= 1 else (long_side, crop_size)


def rect_crop_box(
    height: int,
    width: int,
    target_height: int,
    target_width: int,
    resize_ratio: float = RECT_RESIZE_RATIO,
) -> Box:
    """imagenet18's rect-val crop as a box: Resize(int(min(target) * resize_ratio)), center-crop
    target.

    Where an image is narrower than its batch's mean ratio allows (torchvision would pad it
    with black), the image is scaled up just enough to cover the target instead.
    """
    resized_short_side = int(min(target_height, target_width) * resize_ratio)
    return resize_center_crop_box(height, width, resized_short_side, target_height, target_width)


def rect_batches(aspect_ratios, batch_size: int) -> list[tuple[list[int], float]]:
    """Indices sorted by aspect ratio (w/h; ties by index), cut into batches with mean ratios."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ratios = [float(r) for r in aspect_ratios]
    order = sorted(range(len(ratios)), key=lambda index: (ratios[index], index))
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batches.append((indices, math.fsum(ratios[i] for i in indices) / len(indices)))
    return batches


# --------------------------------------------------------------------------- DCT scaling


def dct_scale_for_box(
    box_height: int,
    box_width: int,
    out_height: int,
    out_width: int,
    allowed: tuple[tuple[int, int], ...] = POWER_OF_TWO_SCALES,
) -> tuple[int, int]:
    """Smallest allowed (num, den) with box_height*num/den >= out_height and same for width."""
    scales = sorted(allowed, key=lambda scale: Fraction(*scale))
    for num, den in scales:
        if box_height * num >= out_height * den and box_width * num >= out_width * den:
            return num, den
    return scales[-1]


def scaled_image_size(height: int, width: int, num: int, den: int) -> tuple[int, int]:
    """Image size after decoding at num/den: ceil(side * num / den), as libjpeg(-turbo) computes it
    (``jdiv_round_up`` in jdmaster.c; ``TJSCALED`` in turbojpeg.h)."""
    return scaled_dim(height, (num, den)), scaled_dim(width, (num, den))


def scale_box(box: Box, num: int, den: int, scaled_height: int, scaled_width: int) -> Box:
    """Map a stored-coords box into the image decoded at num/den (size: scaled_image_size)."""
    top, left, height, width = box
    scaled_top = min((top * num) // den, scaled_height - 1)
    scaled_left = min((left * num) // den, scaled_width - 1)
    scaled_bottom = min(-(-(top + height) * num // den), scaled_height)
    scaled_right = min(-(-(left + width) * num // den), scaled_width)
    return scaled_top, scaled_left, scaled_bottom - scaled_top, scaled_right - scaled_left


def box_within_scaled(
    box: Box, num: int, den: int, scaled_box: Box
) -> tuple[float, float, float, float]:
    """The exact scaled box as float (top, left, height, width) from ``scaled_box``'s corner."""
    top, left, height, width = box
    scale = num / den
    return top * scale - scaled_box[0], left * scale - scaled_box[1], height * scale, width * scale

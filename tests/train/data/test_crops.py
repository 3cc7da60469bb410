"""train.data.crops: crop boxes inside the image, seeded determinism, torchvision equivalence,
rect-val geometry and DCT scale choice."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest

from tests.train.data import one_box
from train.data.crops import (
    TrainCrop,
    box_within_scaled,
    center_crop_box,
    dct_scale_for_box,
    fallback_crop_box,
    rect_batches,
    rect_crop_box,
    rect_target_size,
    resize_center_crop_box,
    resized_size,
    scale_box,
    scaled_image_size,
)

torch = pytest.importorskip("torch")
transforms = pytest.importorskip("torchvision.transforms")
F = pytest.importorskip("torchvision.transforms.functional")
Image = pytest.importorskip("PIL.Image")

LIBJPEG_SCALES = [(1, 8), (1, 4), (3, 8), (1, 2), (5, 8), (3, 4), (7, 8), (1, 1)]


def assert_inside(box, height, width):
    top, left, box_height, box_width = box
    assert all(isinstance(v, int) for v in box), box
    assert box_height >= 1 and box_width >= 1, box
    assert 0 <= top and top + box_height <= height, (box, height, width)
    assert 0 <= left and left + box_width <= width, (box, height, width)


def random_sizes(seed, count, low=1, high=700):
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(count)]


def smooth_image(height, width, seed=0):
    """Low-frequency RGB pattern: resampling differences stay small, misplacement does not."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6.3)
        wave = np.sin(2 * np.pi * (fy * y / height + fx * x / width) + phase)
        channels.append(127.5 + 100 * wave + 20 * (x / width - y / height))
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def crop_then_resize(image, box, out_height, out_width):
    top, left, box_height, box_width = box
    region = (left, top, left + box_width, top + box_height)
    return image.resize((out_width, out_height), Image.BILINEAR, box=region)


def mean_abs_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


# --------------------------------------------------------------------------- random resized crop


@pytest.mark.parametrize("min_scale", [0.08, 0.35, 1.0])
def test_random_resized_crop_box_inside_image(min_scale):
    rng = random.Random(0)
    for height, width in random_sizes(1, 300) + [(1, 1), (1, 500), (500, 1), (2, 3)]:
        for _ in range(5):
            assert_inside(one_box(TrainCrop(1, min_scale), height, width, rng), height, width)


def test_random_resized_crop_box_deterministic_given_seed():
    sizes = random_sizes(2, 50)
    first = [one_box(TrainCrop(1), h, w, random.Random(7)) for h, w in sizes]
    again = [one_box(TrainCrop(1), h, w, random.Random(7)) for h, w in sizes]
    other = [one_box(TrainCrop(1), h, w, random.Random(8)) for h, w in sizes]
    assert first == again
    assert first != other


def ks_statistic(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def box_features(boxes, height, width):
    boxes = np.asarray(boxes, np.float64)
    top, left, box_height, box_width = boxes.T
    return {
        "area": box_height * box_width / (height * width),
        "log_ratio": np.log(box_width / box_height),
        "top": (top + box_height / 2) / height,
        "left": (left + box_width / 2) / width,
    }


@pytest.mark.parametrize(
    "height,width,min_scale",
    [(160, 213, 0.08), (375, 500, 0.35), (100, 400, 0.08), (320, 320, 0.5)],
)
def test_random_resized_crop_box_matches_torchvision_distribution(height, width, min_scale):
    num_samples = 8000
    rng = random.Random(1234)
    ours = [one_box(TrainCrop(1, min_scale), height, width, rng) for _ in range(num_samples)]
    torch.manual_seed(1234)
    image = torch.empty(1, height, width)
    params = transforms.RandomResizedCrop.get_params
    theirs = [params(image, [min_scale, 1.0], [3 / 4, 4 / 3]) for _ in range(num_samples)]
    # Two-sample KS critical value at alpha = 1e-4 is 2.23 * sqrt(2 / n) (~0.035 here).
    critical = 2.23 * math.sqrt(2 / num_samples)
    ours_features, their_features = (
        box_features(ours, height, width),
        box_features(theirs, height, width),
    )
    for name in ours_features:
        statistic = ks_statistic(ours_features[name], their_features[name])
        assert statistic < critical, (name, statistic, critical)
    fallback = fallback_crop_box(height, width)
    ours_fallback_rate = sum(box == fallback for box in ours) / num_samples
    their_fallback_rate = sum(tuple(box) == fallback for box in theirs) / num_samples
    assert abs(ours_fallback_rate - their_fallback_rate) < 0.01


@pytest.mark.parametrize(
    "height,width,scale",
    [
        (10, 1000, (0.08, 1.0)),  # too wide: every attempt fails, crop to max ratio
        (1000, 10, (0.08, 1.0)),  # too tall: crop to min ratio
        (7, 3001, (0.5, 1.0)),
        (300, 400, (1.5, 2.0)),  # target area larger than the image: whole image
        (1, 1, (1.5, 2.0)),
    ],
)
def test_random_resized_crop_box_fallback_matches_torchvision_exactly(height, width, scale):
    torch.manual_seed(0)
    theirs = transforms.RandomResizedCrop.get_params(
        torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3]
    )
    ours = one_box(TrainCrop(1, *scale), height, width, random.Random(0))
    assert ours == fallback_crop_box(height, width) == tuple(theirs)


def test_train_crop_validates():
    with pytest.raises(ValueError):
        TrainCrop(crop_size=224, min_scale=0.0)
    with pytest.raises(ValueError):
        TrainCrop(crop_size=224, ratio=(4 / 3, 3 / 4))
    with pytest.raises(ValueError):
        TrainCrop(crop_size=0)


# --------------------------------------------------------------------------- center crop


def coordinate_image(height, width):
    rows = torch.arange(height).view(height, 1).expand(height, width)
    cols = torch.arange(width).view(1, width).expand(height, width)
    return torch.stack([rows, cols])


@pytest.mark.parametrize(
    "height,width", [(256, 341), (341, 256), (257, 300), (256, 256), (300, 259)]
)
def test_center_crop_box_equals_torchvision_offsets_when_no_resize(height, width):
    crop_size = 224  # resize to 256: images whose short side is 256 are left as they are
    resized_short_side = min(height, width)
    assert resized_size(height, width, resized_short_side) == (height, width)
    cropped = F.center_crop(coordinate_image(height, width), [crop_size, crop_size])
    expected = (int(cropped[0, 0, 0]), int(cropped[1, 0, 0]), crop_size, crop_size)
    assert (
        resize_center_crop_box(height, width, resized_short_side, crop_size, crop_size) == expected
    )
    if resized_short_side == 256:
        assert center_crop_box(height, width, crop_size) == expected


def test_center_crop_box_inside_image():
    for height, width in random_sizes(3, 300) + [(1, 1), (1, 900), (900, 1)]:
        for crop_size in (32, 128, 224, 288):
            box = center_crop_box(height, width, crop_size)
            assert_inside(box, height, width)
            if min(height, width) >= 8:
                assert abs(box[2] - box[3]) <= 1  # a square, up to rounding


def torchvision_region(height, width, resized_short_side, crop_height, crop_width):
    """Per axis (start, end, stored px per output px) of the region torchvision's Resize +
    CenterCrop samples, read off a coordinate ramp pushed through them (bilinear on a ramp is
    exact away from the borders)."""
    rows = torch.arange(height, dtype=torch.float64).view(1, height, 1).expand(1, height, width)
    cols = torch.arange(width, dtype=torch.float64).view(1, 1, width).expand(1, height, width)
    resized = F.resize(
        torch.cat([rows, cols]),
        [resized_short_side],
        interpolation=F.InterpolationMode.BILINEAR,
        antialias=False,
    )
    crop = F.center_crop(resized, [crop_height, crop_width])
    regions = []
    for axis, length in ((0, crop_height), (1, crop_width)):
        line = crop[0, :, crop_width // 2] if axis == 0 else crop[1, crop_height // 2, :]
        a, b = length // 4, length // 4 + max(1, length // 2)
        step = float(line[b] - line[a]) / (b - a)
        first_center = float(line[a]) - a * step  # stored coordinate of output pixel 0's centre
        regions.append(
            (first_center + 0.5 - step / 2, first_center + 0.5 + step * (length - 0.5), step)
        )
    return regions


def test_resize_center_crop_box_within_half_pixel_of_torchvision_region():
    rng = random.Random(13)
    for _ in range(80):
        height, width = rng.randint(40, 500), rng.randint(40, 500)
        crop_height = rng.choice([32, 96, 128, 224, 288])
        crop_width = rng.choice([crop_height, crop_height + 8 * rng.randint(1, 20)])
        if rng.random() < 0.5:
            crop_height, crop_width = crop_width, crop_height
        resized_short_side = max(crop_height, crop_width) + rng.randint(0, 60)  # always fits
        box = resize_center_crop_box(height, width, resized_short_side, crop_height, crop_width)
        assert_inside(box, height, width)
        scale = min(height, width) / resized_short_side
        regions = torchvision_region(height, width, resized_short_side, crop_height, crop_width)
        for (start, end, step), box_start, box_length in zip(regions, box[:2], box[2:]):
            # torchvision's truncated long side has its own step; we keep one scale for both axes
            allowance = abs(step - scale) * end / step + 1e-6
            assert abs(box_start - start) <= 0.5 + allowance, (height, width, box, regions)
            assert abs(box_start + box_length - end) <= 0.5 + allowance, (
                height,
                width,
                box,
                regions,
            )


@pytest.mark.parametrize(
    "crop_size,crop_ratio", [(224, 0.875), (128, 0.875), (288, 1 / 1.14), (96, 1.0)]
)
def test_center_crop_box_matches_torchvision_pixels(crop_size, crop_ratio):
    reference = transforms.Compose(
        [transforms.Resize(round(crop_size / crop_ratio)), transforms.CenterCrop(crop_size)]
    )
    for index, (height, width) in enumerate(random_sizes(4, 8, 80, 600) + [(160, 213), (600, 90)]):
        image = smooth_image(height, width, seed=index)
        box = center_crop_box(height, width, crop_size, crop_ratio)
        ours = crop_then_resize(image, box, crop_size, crop_size)
        assert mean_abs_diff(ours, reference(image)) < 3, (height, width, box)


# --------------------------------------------------------------------------- rect validation


def imagenet18_target_size(crop_size, aspect_ratio):
    """CropArTfm's arithmetic (without its rounding of ratios to 5 decimals)."""
    if aspect_ratio < 1:
        return int(crop_size / aspect_ratio) // 8 * 8, crop_size
    return crop_size, int(crop_size * aspect_ratio) // 8 * 8


def test_rect_target_size_known_values():
    assert rect_target_size(288, 4 / 3) == (288, 384)
    assert rect_target_size(288, 3 / 4) == (384, 288)
    assert rect_target_size(288, 1.0) == (288, 288)
    assert rect_target_size(224, 1.5) == (224, 336)
    assert rect_target_size(128, 1.2) == (128, 152)
    assert rect_target_size(128, 1 / 1.2) == (152, 128)
    assert rect_target_size(100, 1.0) == (100, 100)  # imagenet18 would give 100x96


def test_rect_target_size_multiple_of_8_and_orientation():
    rng = random.Random(5)
    for _ in range(2000):
        crop_size = 8 * rng.randint(4, 48)
        aspect_ratio = math.exp(rng.uniform(-1.2, 1.2))
        target_height, target_width = rect_target_size(crop_size, aspect_ratio)
        assert target_height % 8 == 0 and target_width % 8 == 0
        assert min(target_height, target_width) == crop_size
        if aspect_ratio >= 1:
            assert target_height == crop_size and target_width >= crop_size
        else:
            assert target_width == crop_size and target_height >= crop_size
        long_side = max(target_height, target_width)
        assert (
            crop_size * max(aspect_ratio, 1 / aspect_ratio) - 8
            < long_side
            <= crop_size * max(aspect_ratio, 1 / aspect_ratio) + 1e-6
        )
        expected = imagenet18_target_size(crop_size, aspect_ratio)
        exact = crop_size * max(aspect_ratio, 1 / aspect_ratio)
        if abs(exact - round(exact)) > 1e-6:  # away from float ties, identical to imagenet18
            assert (target_height, target_width) == expected


def test_rect_crop_box_inside_image_and_target_shaped():
    rng = random.Random(6)
    for height, width in random_sizes(7, 300, 20, 700):
        crop_size = rng.choice([128, 224, 288])
        target_height, target_width = rect_target_size(crop_size, math.exp(rng.uniform(-0.7, 0.7)))
        box = rect_crop_box(height, width, target_height, target_width)
        assert_inside(box, height, width)
        # Same shape as the target up to rounding (no stretching).
        target_ratio = target_width / target_height
        assert abs(box[3] / box[2] - target_ratio) <= target_ratio * (2 / box[2] + 2 / box[3])


@pytest.mark.parametrize("crop_size", [128, 288])
def test_rect_crop_box_matches_imagenet18_pixels(crop_size):
    for index, (height, width) in enumerate(random_sizes(8, 8, 100, 500)):
        image = smooth_image(height, width, seed=index)
        target_height, target_width = rect_target_size(crop_size, width / height)
        reference = F.center_crop(
            F.resize(image, int(crop_size * 1.14)), [target_height, target_width]
        )
        box = rect_crop_box(height, width, target_height, target_width)
        ours = crop_then_resize(image, box, target_height, target_width)
        assert mean_abs_diff(ours, reference) < 3, (height, width, box)


def test_rect_crop_box_covers_instead_of_padding():
    # A square image in a batch of 2:1 landscapes: torchvision would pad; we zoom in.
    target_height, target_width = rect_target_size(288, 2.0)
    assert (target_height, target_width) == (288, 576)
    box = rect_crop_box(400, 400, target_height, target_width)
    assert_inside(box, 400, 400)
    assert box[3] == 400 and box[1] == 0
    assert abs(box[2] - 200) <= 1


def test_rect_batches_cover_every_index_once_sorted():
    rng = random.Random(9)
    ratios = [
        rng.choice([0.75, 1.0, 4 / 3, 1.5]) if rng.random() < 0.5 else rng.uniform(0.3, 3)
        for _ in range(1003)
    ]
    batches = rect_batches(ratios, 64)
    flat = [index for indices, _ in batches for index in indices]
    assert sorted(flat) == list(range(len(ratios)))
    assert [len(indices) for indices, _ in batches] == [64] * 15 + [1003 - 15 * 64]
    assert [ratios[i] for i in flat] == sorted(ratios)
    for indices, mean_ratio in batches:
        assert mean_ratio == pytest.approx(sum(ratios[i] for i in indices) / len(indices))
        assert min(ratios[i] for i in indices) <= mean_ratio <= max(ratios[i] for i in indices)
    # Ties keep index order: deterministic whatever the input order of equal ratios.
    tied = [i for i in flat if ratios[i] == 1.0]
    assert tied == sorted(tied)
    assert rect_batches(ratios, 64) == batches


def test_rect_batches_edge_cases():
    assert rect_batches([], 8) == []
    assert rect_batches([2.0, 0.5, 1.0], 8) == [([1, 2, 0], pytest.approx(3.5 / 3))]
    assert rect_batches([2.0, 0.5, 1.0], 1) == [([1], 0.5), ([2], 1.0), ([0], 2.0)]
    with pytest.raises(ValueError):
        rect_batches([1.0], 0)


# --------------------------------------------------------------------------- DCT scaling


@pytest.mark.parametrize(
    "box_height,box_width,out_height,out_width,expected",
    [
        (256, 256, 128, 128, (1, 2)),  # exactly covers at 1/2
        (255, 256, 128, 128, (1, 1)),  # just too small for 1/2
        (512, 512, 128, 128, (1, 4)),
        (1024, 1024, 128, 128, (1, 8)),
        (1023, 1024, 128, 128, (1, 4)),
        (512, 200, 128, 128, (1, 1)),  # the narrow side decides
        (100, 100, 128, 128, (1, 1)),  # upscale
        (128, 128, 128, 128, (1, 1)),
        (480, 640, 224, 298, (1, 2)),  # rect-shaped output
        (480, 640, 224, 321, (1, 1)),
    ],
)
def test_dct_scale_for_box(box_height, box_width, out_height, out_width, expected):
    assert dct_scale_for_box(box_height, box_width, out_height, out_width) == expected


def test_dct_scale_for_box_with_other_allowed_scales():
    assert dct_scale_for_box(200, 200, 128, 128, allowed=LIBJPEG_SCALES) == (
        3,
        4,
    )  # 5/8 gives 125 < 128
    assert dct_scale_for_box(256, 256, 192, 192, allowed=tuple(reversed(LIBJPEG_SCALES))) == (3, 4)
    assert dct_scale_for_box(100, 100, 128, 128, allowed=((1, 8), (1, 2))) == (
        1,
        2,
    )  # largest when none covers


def test_scaled_image_size_is_ceiling():
    assert scaled_image_size(161, 213, 1, 8) == (21, 27)
    assert scaled_image_size(160, 213, 1, 2) == (80, 107)
    assert scaled_image_size(333, 500, 1, 1) == (333, 500)
    assert scaled_image_size(1, 1, 1, 8) == (1, 1)


def test_scale_box_contains_exact_box_and_stays_inside():
    rng = random.Random(10)
    for height, width in random_sizes(11, 200, 1, 900):
        for num, den in LIBJPEG_SCALES:
            scaled_height, scaled_width = scaled_image_size(height, width, num, den)
            box = one_box(TrainCrop(1), height, width, rng)
            scaled = scale_box(box, num, den, scaled_height, scaled_width)
            assert_inside(scaled, scaled_height, scaled_width)
            exact_top, exact_left, exact_height, exact_width = box_within_scaled(
                box, num, den, scaled
            )
            assert exact_top >= 0 and exact_left >= 0
            assert exact_top + exact_height <= scaled[2] + 1e-9
            assert exact_left + exact_width <= scaled[3] + 1e-9
            assert exact_top < 1 and exact_left < 1  # floor overshoots by under a scaled pixel
            if (num, den) == (1, 1):
                assert scaled == box


def test_dct_scaled_decode_matches_full_decode():
    turbojpeg = pytest.importorskip("turbojpeg")
    try:
        decoder = turbojpeg.TurboJPEG()
    except (OSError, RuntimeError) as error:  # no libturbojpeg on this machine
        pytest.skip(f"libturbojpeg unavailable: {error}")
    height, width, out_size = 523, 711, 96
    buffer = io.BytesIO()
    smooth_image(height, width).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    full = Image.fromarray(decoder.decode(data, pixel_format=turbojpeg.TJPF_RGB))
    rng = random.Random(12)
    for _ in range(10):
        box = one_box(TrainCrop(1, 0.3), height, width, rng)
        num, den = dct_scale_for_box(box[2], box[3], out_size, out_size)
        scaled = decoder.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=(num, den))
        assert scaled.shape[:2] == scaled_image_size(height, width, num, den)
        scaled_box = scale_box(box, num, den, *scaled.shape[:2])
        top, left, box_height, box_width = scaled_box
        region = Image.fromarray(scaled[top : top + box_height, left : left + box_width])
        exact_top, exact_left, exact_height, exact_width = box_within_scaled(
            box, num, den, scaled_box
        )
        ours = region.resize(
            (out_size, out_size),
            Image.BILINEAR,
            box=(exact_left, exact_top, exact_left + exact_width, exact_top + exact_height),
        )
        reference = crop_then_resize(full, box, out_size, out_size)
        assert mean_abs_diff(ours, reference) < 3, (box, num, den)

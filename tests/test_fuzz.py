"""Time-bounded fuzzing (a few seconds each in CI): mutated images through prep's whole per-image
path, mutated tars through the scanner against tarfile. `python -m tests.fuzz 300` hunts longer."""
from __future__ import annotations

import functools
import io
import itertools
import random

import numpy as np
from PIL import Image

from prep.resize import PreparedImage, RejectedImage, prepare_image, target_dims
from tests.fuzz import mutate, run_cases

IMAGE_BUDGET_S = 3.0


@functools.lru_cache(maxsize=1)
def image_seeds() -> list[bytes]:
    """Small valid inputs of every kind prep reads (what the sniffer routes to each decoder)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8))
    seeds = []

    def save(image, fmt, **kwargs):
        out = io.BytesIO()
        image.save(out, fmt, **kwargs)
        seeds.append(out.getvalue())

    save(rgb, "JPEG", quality=90)
    save(rgb, "JPEG", quality=75, progressive=True)
    save(rgb, "JPEG", quality=95, subsampling=0)
    save(rgb.convert("L"), "JPEG")
    save(rgb.convert("CMYK"), "JPEG")
    save(rgb, "PNG")
    save(rgb.convert("P"), "PNG", transparency=3)
    save(rgb.convert("RGBA"), "PNG")
    save(rgb.convert("I;16"), "PNG")
    save(rgb.convert("P"), "GIF")
    save(rgb, "BMP")
    save(rgb, "TIFF")
    try:
        save(rgb, "WEBP")
    except (KeyError, OSError):  # a PIL built without WebP
        pass
    return seeds


def check_image_case(seed: int) -> None:
    rng = random.Random(seed)
    original = rng.choice(image_seeds())
    data = mutate(original, rng, protect=rng.choice((0, 4, 12)))
    prep_sizes = rng.choice(((32,), (24, 48), (64,)))
    upscale = rng.random() < 0.3
    try:
        prepared = prepare_image(data, prep_sizes, 90, upscale)
    except RejectedImage as rejected:
        assert rejected.reason, f"seed {seed}: empty reason"
        return
    except Exception as err:  # anything else escaping is the bug this test hunts
        raise AssertionError(f"seed {seed}: {type(err).__name__}: {err}") from err
    assert isinstance(prepared, PreparedImage)
    for prep_size, output in zip(prep_sizes, prepared.outputs):
        expected = target_dims(prepared.orig_height, prepared.orig_width, prep_size, upscale)
        assert (output.height, output.width) == expected, f"seed {seed}"
        with Image.open(io.BytesIO(output.jpeg)) as stored:
            assert stored.size == (output.width, output.height) and stored.mode == "RGB", f"seed {seed}"


def fuzz_images(budget_s: float, first_seed: int = 0) -> int:
    return run_cases(itertools.count(first_seed), budget_s, check_image_case)


def test_fuzz_image_path():
    assert fuzz_images(IMAGE_BUDGET_S) > 50

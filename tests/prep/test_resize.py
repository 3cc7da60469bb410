"""prep.resize: odd inputs become RGB JPEGs at the right size; bad ones are rejected, saying why."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from formats import jpeg
from prep.resize import RejectedImage, prepare_image, target_dims
from tests.conftest import jpeg_bytes


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_target_dims_keeps_aspect_and_never_upscales_by_default():
    assert target_dims(375, 500, 160, False) == (160, 213)
    assert target_dims(500, 375, 160, False) == (213, 160)
    assert target_dims(160, 999, 160, False) == (160, 999)
    assert target_dims(60, 80, 160, False) == (60, 80)
    assert target_dims(60, 80, 160, True) == (160, 213)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_modes_become_rgb_at_prep_size(mode):
    data = jpeg_bytes(375, 500, mode=mode)
    prepared = prepare_image(data, (160, 320), quality=90)
    assert (prepared.orig_height, prepared.orig_width) == (375, 500)
    for output, expected in zip(prepared.outputs, [(160, 213), (320, 427)]):
        image = decode(output.jpeg)
        assert image.format == "JPEG" and image.mode == "RGB"
        assert (output.height, output.width) == expected == (image.height, image.width)


def test_cmyk_colours_survive():
    rgb = np.zeros((200, 300, 3), np.uint8)
    rgb[..., 0] = 220  # red
    out = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(out, "JPEG", quality=95)
    pixels = np.asarray(decode(prepare_image(out.getvalue(), (160,), 90).outputs[0].jpeg))
    assert pixels[..., 0].mean() > 180 and pixels[..., 1].mean() < 60 and pixels[..., 2].mean() < 60


def test_png_named_jpeg_and_transparency_over_white():
    rgba = np.zeros((200, 300, 4), np.uint8)  # fully transparent black
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, "PNG")
    assert jpeg.sniff(out.getvalue()) == "png"
    pixels = np.asarray(decode(prepare_image(out.getvalue(), (160,), 90).outputs[0].jpeg))
    assert pixels.min() > 240  # composited over white, not the hidden black


def test_palette_image():
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (120, 200, 3), np.uint8)
    ).convert("P")
    out = io.BytesIO()
    image.save(out, "GIF")
    prepared = prepare_image(out.getvalue(), (100,), 90)
    assert (prepared.outputs[0].height, prepared.outputs[0].width) == (100, 167)


def test_small_original_kept_unless_upscale():
    data = jpeg_bytes(60, 80)
    assert (prepare_image(data, (160,), 90).outputs[0].height) == 60
    assert (prepare_image(data, (160,), 90, upscale=True).outputs[0].height) == 160


def test_dct_scaling_picks_smallest_covering_power_of_two():
    assert jpeg.smallest_covering_scale(375, 500, 160) == (1, 2)
    assert jpeg.smallest_covering_scale(375, 500, 320) == (1, 1)
    assert jpeg.smallest_covering_scale(1500, 2000, 160) == (1, 8)
    assert jpeg.smallest_covering_scale(100, 100, 160) == (1, 1)
    # an output never comes from a decode smaller than itself
    prepared = prepare_image(jpeg_bytes(330, 440), (160,), 90)
    assert prepared.outputs[0].height == 160


def test_quality_controls_size():
    data = jpeg_bytes(375, 500, seed=3)
    low, high = (prepare_image(data, (160,), q).outputs[0].jpeg for q in (50, 95))
    assert len(low) < len(high)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (b"\xff\xd8\xff" + b"\x00" * 40, "undecodable jpeg"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "undecodable png"),
    ],
)
def test_garbage_is_rejected_with_a_reason(data, reason):
    with pytest.raises(RejectedImage, match=reason):
        prepare_image(data, (160,), 90)


@pytest.mark.parametrize("keep", [0.2, 0.6, 0.95])
def test_truncated_jpeg_is_rejected(keep):
    data = jpeg_bytes(375, 500)
    with pytest.raises(RejectedImage, match="undecodable jpeg"):
        prepare_image(data[: int(len(data) * keep)], (160,), 90)


def test_reject_reasons_are_stable_text():
    """Reasons go into the manifest, which must be identical across runs (no object addresses)."""
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    reasons = set()
    for _ in range(2):
        with pytest.raises(RejectedImage) as caught:
            prepare_image(data, (160,), 90)
        reasons.add(caught.value.reason)
    assert len(reasons) == 1 and "0x" not in reasons.pop()

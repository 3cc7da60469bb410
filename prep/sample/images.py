"""Procedural images for `prep sample`: class identity is a global texture + palette.

Training sees 64-128 px random-resized, possibly flipped crops of 160 px copies, so every class
cue must survive any crop, any zoom and a mirror: a palette (hue) plus a texture type and an
orientation that a flip keeps (0, 90 or "diagonal" with a random sign). Texture scale is set
relative to the shorter side, so tiny and large images look alike after resizing. Per-image
jitter (phase, scale, angle, brightness, illumination, noise, a distractor shape) keeps it from
being trivial. Everything here is pure: same rng state in, same bytes out.
"""

from __future__ import annotations

import colorsys
import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG_QUALITY = 90
TEXTURES = ("stripes", "checks", "dots", "rings", "waves", "zigzag", "hatch")
# (texture, angle in degrees; None = diagonal, sign drawn per image) for the first ten classes:
# every pair differs in texture or in a flip-proof orientation, so grayscale crops stay separable.
DESIGNED_STYLES = (
    ("stripes", 0.0),
    ("stripes", 90.0),
    ("checks", 0.0),
    ("dots", 0.0),
    ("rings", 0.0),
    ("stripes", None),
    ("checks", None),
    ("waves", 0.0),
    ("hatch", 0.0),
    ("zigzag", 90.0),
)
# (height, width) of ordinary images and their weights: mostly 500 px landscape, as ImageNet.
COMMON_SHAPES = ((375, 500), (333, 500), (500, 375), (500, 333), (500, 500), (281, 500), (400, 500))
COMMON_WEIGHTS = (0.42, 0.18, 0.12, 0.06, 0.06, 0.08, 0.08)
LARGE_SHAPES = ((480, 640), (600, 800), (800, 600), (533, 800))
NOISE_BANK_SIDE = 1024
BAND_PIXELS = 16384  # pixels per band of rows in render_image (64 KiB float32 temporaries)


@dataclass(frozen=True)
class ClassStyle:
    """What makes one class recognisable; fixed per class index, independent of the seed."""

    texture: str
    angle_deg: float | None  # None: diagonal, +-45 degrees chosen per image (flip-invariant)
    periods: float  # texture periods across the shorter side
    bg_rgb: tuple[float, float, float]
    fg_rgb: tuple[float, float, float]


def _hsv255(hue: float, saturation: float, value: float) -> tuple[float, float, float]:
    return tuple(255.0 * c for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def class_style(class_index: int, num_classes: int) -> ClassStyle:
    """Hues spread evenly over the classes; textures designed for ten, cycled beyond."""
    if class_index < len(DESIGNED_STYLES):
        texture, angle_deg = DESIGNED_STYLES[class_index]
    else:
        texture = TEXTURES[class_index % len(TEXTURES)]
        angle_deg = (0.0, 90.0, None)[(class_index // len(TEXTURES)) % 3]
    hue = class_index / max(num_classes, 1)
    periods = (9.0, 14.0, 20.0)[class_index % 3]
    return ClassStyle(
        texture, angle_deg, periods, _hsv255(hue + 0.07, 0.45, 0.35), _hsv255(hue, 0.8, 0.92)
    )


def draw_shape(rng: np.random.Generator, *, force: str | None = None) -> tuple[int, int]:
    """An ImageNet-like (height, width): mostly 500 px landscape, some portrait, few large or tiny.

    `force` ("portrait", "large", "tiny") lets the caller guarantee each kind appears at least once.
    """
    kind = force or rng.choice(["common", "large", "tiny"], p=[0.92, 0.04, 0.04])
    if kind == "tiny":
        short = int(rng.integers(40, 100))
        long = int(round(short * rng.uniform(1.0, 1.5)))
        return (short, long) if rng.random() < 0.7 else (long, short)
    if kind == "large":
        return LARGE_SHAPES[int(rng.integers(len(LARGE_SHAPES)))]
    if kind == "portrait":
        return (500, 375) if rng.random() < 0.7 else (500, 333)
    return COMMON_SHAPES[int(rng.choice(len(COMMON_SHAPES), p=COMMON_WEIGHTS))]


def _soft_square(wave: np.ndarray, sharpness: float) -> np.ndarray:
    """Turns a wave in [-1, 1] into a mask in [0, 1] with soft edges (less JPEG ringing)."""
    return np.clip(0.5 + sharpness * wave, 0.0, 1.0)


def _texture_mask(
    style: ClassStyle, t: np.ndarray, u: np.ndarray, r: np.ndarray | None, sharpness: float
) -> np.ndarray:
    """Mask in [0, 1]; t, u are rotated coordinates and r a radius, all in texture periods."""
    two_pi = np.float32(2 * np.pi)
    if style.texture == "stripes":
        return _soft_square(np.sin(two_pi * t), sharpness)
    if style.texture == "checks":
        return _soft_square(np.sin(two_pi * t) * np.sin(two_pi * u), sharpness)
    if style.texture == "dots":
        return _soft_square(np.cos(two_pi * t) + np.cos(two_pi * u) - 1.0, sharpness)
    if style.texture == "rings":
        return _soft_square(np.sin(two_pi * r), sharpness)
    if style.texture == "waves":
        return _soft_square(np.sin(two_pi * (t + 0.3 * np.sin(np.pi * u))), sharpness)
    if style.texture == "zigzag":
        return _soft_square(np.sin(two_pi * (t + np.abs(u - np.floor(u) - 0.5))), sharpness)
    if style.texture == "hatch":
        lines = np.maximum(np.cos(two_pi * t), np.cos(two_pi * u))
        return _soft_square(lines - 0.75, 2.0 * sharpness)
    raise ValueError(f"unknown texture {style.texture!r}")


@functools.cache
def _noise_bank() -> np.ndarray:
    """Fixed Gaussian noise that images take random windows of: drawing fresh noise per image
    would cost more than all the rest of the synthesis."""
    return np.random.default_rng(0).standard_normal(
        (NOISE_BANK_SIDE, NOISE_BANK_SIDE), dtype=np.float32
    )


def _noise_window(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    bank = _noise_bank()
    if height > NOISE_BANK_SIDE or width > NOISE_BANK_SIDE:
        bank = np.tile(bank, (-(-height // NOISE_BANK_SIDE), -(-width // NOISE_BANK_SIDE)))
    y0 = int(rng.integers(0, bank.shape[0] - height + 1))
    x0 = int(rng.integers(0, bank.shape[1] - width + 1))
    return bank[y0 : y0 + height, x0 : x0 + width]


def render_image(style: ClassStyle, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One uint8 (height, width, 3) image of a class, with per-image jitter drawn from rng.

    Works in bands of rows: small temporaries come from the heap and are reused, whereas
    whole-image temporaries are fresh pages each time, and page faults then dominate the cost.
    """
    height, width = shape
    short = min(height, width)
    periods = np.float32(style.periods * np.exp(rng.uniform(-0.2, 0.2)))
    angle = 45.0 * rng.choice([-1.0, 1.0]) if style.angle_deg is None else style.angle_deg
    theta = np.deg2rad(angle + rng.uniform(-8.0, 8.0))
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    phase_t, phase_u, centre_x, centre_y = (
        rng.uniform(-0.5, 0.5, size=4).astype(np.float32) * periods
    )
    sharpness = float(rng.uniform(1.5, 4.0))
    colour_jitter = rng.normal(0.0, 8.0, size=3)
    bg = [np.float32(c + j) for c, j in zip(style.bg_rgb, colour_jitter)]
    fg_minus_bg = [np.float32(f - c) for f, c in zip(style.fg_rgb, style.bg_rgb)]
    gain = np.float32(rng.uniform(0.7, 1.2))
    slope_x, slope_y = rng.uniform(-0.3, 0.3, size=2).astype(np.float32)
    noise = _noise_window(rng, height, width) * np.float32(rng.uniform(0.01, 0.05))  # relative

    # Per-column and per-row terms, so each band needs one broadcast add per field.
    xn = (np.arange(width, dtype=np.float32)[None, :] - width / 2) / np.float32(short)
    yn = (np.arange(height, dtype=np.float32)[:, None] - height / 2) / np.float32(short)
    x, y = xn * periods, yn * periods
    t_x, t_y = x * cos, y * sin + phase_t
    u_x, u_y = -x * sin, y * cos + phase_u
    light_x, light_y = gain * (1.0 + slope_x * xn), gain * slope_y * yn
    image = np.empty((height, width, 3), np.uint8)
    rows = max(1, BAND_PIXELS // width)
    for y0 in range(0, height, rows):
        band = slice(y0, y0 + rows)
        r = (
            np.sqrt((x - centre_x) ** 2 + (y[band] - centre_y) ** 2)
            if style.texture == "rings"
            else None
        )
        mask = _texture_mask(style, t_x + t_y[band], u_x + u_y[band], r, sharpness)
        light = (light_x + light_y[band]) * (1.0 + noise[band])
        lit_mask = mask * light
        for channel in range(3):
            plane = bg[channel] * light + fg_minus_bg[channel] * lit_mask
            image[band, :, channel] = plane.clip(0, 255)
    _paint_distractor(image, rng)
    return image


def _paint_distractor(image: np.ndarray, rng: np.random.Generator) -> None:
    """A random ellipse or rectangle of random colour covering up to ~15% of the image, in place."""
    height, width = image.shape[:2]
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(0.08, 0.25) * height, rng.uniform(0.08, 0.25) * width
    is_ellipse = rng.random() < 0.5
    colour = rng.integers(0, 256, size=3, dtype=np.uint8)
    y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, height))
    x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, width))
    ys = ((np.arange(y0, y1, dtype=np.float32) - cy) / ry)[:, None]
    xs = ((np.arange(x0, x1, dtype=np.float32) - cx) / rx)[None, :]
    inside = (ys**2 + xs**2 <= 1.0) if is_ellipse else np.broadcast_to(True, (y1 - y0, x1 - x0))
    image[y0:y1, x0:x1][inside] = colour


def encode_image(rgb: np.ndarray, kind: str = "rgb") -> bytes:
    """File bytes: "rgb", "gray" or "cmyk" JPEG, or "png" (the .JPEG-named PNG quirk)."""
    image = Image.fromarray(rgb, "RGB")
    buffer = io.BytesIO()
    if kind == "png":
        image.save(buffer, "PNG")
    elif kind in ("rgb", "gray", "cmyk"):
        mode = {"rgb": "RGB", "gray": "L", "cmyk": "CMYK"}[kind]
        image.convert(mode).save(buffer, "JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return buffer.getvalue()

"""Per image, done once: sniff, decode (DCT-scaled), fix odd inputs, resize to every prep_size,
re-encode. Pure functions of the input bytes, so they run in any worker process.

One decode serves all requested sizes: the image is decoded at the smallest power-of-two DCT
scale whose shorter side still covers the largest prep_size, then each output is resized from
that. Target sizes are computed from the ORIGINAL dimensions so they do not depend on the scale.
"""
from __future__ import annotations

import dataclasses
import io
import re
import warnings

import numpy as np
from PIL import Image

from formats import jpeg

# Pillow's resampling filters are antialiased when shrinking (the kernel widens with the
# scale); bilinear is what imagenet18 used for its sz/N copies and costs half of bicubic.
RESAMPLE = Image.BILINEAR


class RejectedImage(Exception):
    """A source member that cannot become a record; `reason` goes into the manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ResizedImage:
    jpeg: bytes
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    orig_height: int
    orig_width: int
    outputs: tuple[ResizedImage, ...]  # one per requested prep_size, in request order


def target_dims(orig_height: int, orig_width: int, prep_size: int, upscale: bool) -> tuple[int, int]:
    """(height, width) with the shorter side = prep_size; small originals stay unless upscale."""
    short_side = min(orig_height, orig_width)
    if short_side == prep_size or (short_side < prep_size and not upscale):
        return orig_height, orig_width
    ratio = prep_size / short_side
    if orig_height <= orig_width:
        return prep_size, max(1, int(orig_width * ratio + 0.5))
    return max(1, int(orig_height * ratio + 0.5)), prep_size


def to_rgb(image: Image.Image) -> Image.Image:
    """CMYK, grayscale, palette, 16-bit: plain RGB. Transparency is composited over white
    (dropping alpha would expose whatever colour the transparent pixels happen to hold)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float32)
        return Image.fromarray(np.clip(wide / max(wide.max(), 1) * 255, 0, 255).astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_pil(data, kind: str, min_short_side: int) -> tuple[np.ndarray, int, int]:
    try:
        image = Image.open(io.BytesIO(data))
        orig_width, orig_height = image.size
        if kind == "jpeg":  # CMYK or no libturbojpeg: PIL's draft mode does the DCT scaling
            scale = jpeg.smallest_covering_scale(orig_height, orig_width, min_short_side)
            image.draft(image.mode, (jpeg.scaled_dim(orig_width, scale), jpeg.scaled_dim(orig_height, scale)))
        image.load()
        pixels = np.asarray(to_rgb(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL names the BytesIO by address; reasons land in the manifest, which must not vary.
        reason = re.sub(r" ?<[^>]* at 0x[0-9a-fA-F]+>", "", str(err))
        raise RejectedImage(f"undecodable {kind}: {reason}") from None
    return pixels, orig_height, orig_width


def decode_rgb(data, min_short_side: int) -> tuple[np.ndarray, int, int]:
    """RGB uint8 HWC decoded at the cheapest scale covering min_short_side, plus the original
    (height, width). Raises RejectedImage for empty, non-image, truncated or corrupt data."""
    if len(data) == 0:
        raise RejectedImage("empty file")
    kind = jpeg.sniff(data)
    if kind is None:
        raise RejectedImage("not an image (unrecognised bytes)")
    tj = jpeg.turbo()
    if kind != "jpeg" or tj is None:
        return _decode_pil(data, kind, min_short_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bad header raises right after warning
            orig_width, orig_height, _, colorspace = tj.decode_header(data)
    except OSError as err:
        raise RejectedImage(f"undecodable jpeg: {err}") from None
    if colorspace in (jpeg.TJCS_CMYK, jpeg.TJCS_YCCK):
        return _decode_pil(data, kind, min_short_side)
    scale = jpeg.smallest_covering_scale(orig_height, orig_width, min_short_side)
    try:
        pixels = jpeg.decode_turbo(data, scale)
    except (OSError, ValueError) as err:
        raise RejectedImage(f"undecodable jpeg: {err}") from None
    return pixels, orig_height, orig_width


def prepare_image(data, prep_sizes: tuple[int, ...], quality: int, upscale: bool = False) -> PreparedImage:
    pixels, orig_height, orig_width = decode_rgb(data, max(prep_sizes))
    decoded = Image.fromarray(pixels)
    outputs = []
    for prep_size in prep_sizes:
        height, width = target_dims(orig_height, orig_width, prep_size, upscale)
        if (height, width) == pixels.shape[:2]:
            resized = pixels
        else:
            resized = np.asarray(decoded.resize((width, height), RESAMPLE))
        outputs.append(ResizedImage(jpeg.encode_jpeg(resized, quality), height, width))
    return PreparedImage(orig_height, orig_width, tuple(outputs))

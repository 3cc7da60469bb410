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


def describe_error(err: BaseException) -> str:
    """`ExceptionType: message`, with object addresses cut (PIL names its BytesIO by address;
    reasons land in the manifest, whose bytes must not vary from run to run)."""
    message = re.sub(r" ?<[^>]* at 0x[0-9a-fA-F]+>", "", str(err)).strip()
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _check_plausible(kind: str, height: int, width: int, nbytes: int) -> None:
    if height <= 0 or width <= 0:
        raise RejectedImage(f"undecodable {kind}: no image size in its header ({width}x{height})")
    problem = jpeg.implausible_size(kind, height, width, nbytes)
    if problem:
        raise RejectedImage(f"implausible {kind}: {problem}")


def _decode_pil(data, kind: str, min_short_side: int) -> tuple[np.ndarray, int, int]:
    # PIL's plugins warn about damage they work around ("Truncated File Read"): the result is
    # judged below, and warnings from workers would only garble the progress bar. Our own pixel
    # budget (checked before any decoding) replaces PIL's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data))
            orig_width, orig_height = image.size
        except Image.DecompressionBombError as err:  # PIL's own limit (2x ours), seen at open
            raise RejectedImage(f"implausible {kind}: {describe_error(err)}") from None
        except Exception as err:  # a plugin may raise anything on a hostile header
            raise RejectedImage(f"undecodable {kind}: {describe_error(err)}") from None
        _check_plausible(kind, orig_height, orig_width, len(data))
        try:
            if kind == "jpeg":  # CMYK or no libturbojpeg: PIL's draft mode does the DCT scaling
                scale = jpeg.smallest_covering_scale(orig_height, orig_width, min_short_side)
                image.draft(image.mode, (jpeg.scaled_dim(orig_width, scale), jpeg.scaled_dim(orig_height, scale)))
            image.load()
            pixels = np.asarray(to_rgb(image))
        except Exception as err:  # ImportError (a LAB TIFF without ImageCms), TypeError, ...
            raise RejectedImage(f"undecodable {kind}: {describe_error(err)}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.size == 0:
        raise RejectedImage(f"undecodable {kind}: decoded to an array of shape {pixels.shape}")
    return pixels, orig_height, orig_width


def decode_rgb(data, min_short_side: int) -> tuple[np.ndarray, int, int]:
    """RGB uint8 HWC decoded at the cheapest scale covering min_short_side, plus the original
    (height, width). Raises RejectedImage for empty, non-image, truncated, corrupt or
    implausible data (a header claiming more pixels than the budget or than the file can hold)."""
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
        raise RejectedImage(f"undecodable jpeg: {describe_error(err)}") from None
    _check_plausible(kind, orig_height, orig_width, len(data))
    scale = jpeg.smallest_covering_scale(orig_height, orig_width, min_short_side)
    cmyk = colorspace in (jpeg.TJCS_CMYK, jpeg.TJCS_YCCK)
    try:
        # CMYK: libjpeg-turbo cannot make RGB of it, PIL can, but PIL hides libjpeg's corruption
        # warnings; a CMYK decode here surfaces them (22 of ImageNet's 1.28M images pay for it).
        pixels = jpeg.decode_turbo(data, scale, jpeg.TJPF_CMYK if cmyk else jpeg.TJPF_RGB)
    except (OSError, ValueError) as err:
        raise RejectedImage(f"undecodable jpeg: {describe_error(err)}") from None
    if cmyk:
        return _decode_pil(data, kind, min_short_side)
    return pixels, orig_height, orig_width


def prepare_image(data, prep_sizes: tuple[int, ...], quality: int, upscale: bool = False) -> PreparedImage:
    pixels, orig_height, orig_width = decode_rgb(data, max(prep_sizes))
    for prep_size in prep_sizes:
        height, width = target_dims(orig_height, orig_width, prep_size, upscale)
        if max(height, width) > jpeg.MAX_JPEG_SIDE:  # a sliver: 40 x 70,000 px, say
            raise RejectedImage(f"cannot store: {orig_width}x{orig_height} at prep_size {prep_size} is "
                                f"{width}x{height}, over JPEG's {jpeg.MAX_JPEG_SIDE:,} px limit")
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

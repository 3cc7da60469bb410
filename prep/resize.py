"""Per image, done once: sniff, decode (DCT-scaled), fix odd inputs, resize to every prep_size,
re-encode. Pure functions of the input bytes, so they run in any worker process.

One decode serves all requested sizes: the image is decoded at the smallest power-of-two DCT
scale whose shorter side still covers the largest prep_size, then each output is resized from
that. Target sizes are computed from the ORIGINAL dimensions so they do not depend on the scale.

What is already right is reused: a baseline RGB JPEG whose stored size equals its original
size (shorter side = prep_size, or a small original kept as it is) is stored byte for byte, not
re-encoded (a second JPEG generation only loses quality); it is still decoded once, to reject
truncated data. Every input that had to be converted (CMYK, grayscale, palette, alpha, PNG and
other formats) says what was done, for the manifest.
"""
from __future__ import annotations

import dataclasses
import io
import re
import warnings

import numpy as np
from PIL import Image

from formats import jpeg
from formats.record import checksum

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
    stored_as_is: bool = False  # the source's own bytes (already at size), not a re-encode
    # crc32 of `jpeg`, computed here in the worker: the build's one writer process is its
    # sequential part, and at 16 cores every microsecond it spends per image counts.
    crc32: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "crc32", checksum(self.jpeg))


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    orig_height: int
    orig_width: int
    outputs: tuple[ResizedImage, ...]  # one per requested prep_size, in request order
    conversion: str | None = None  # what made an odd input an RGB JPEG, e.g. "CMYK JPEG -> RGB JPEG"


@dataclasses.dataclass(frozen=True)
class _Decoded:
    pixels: np.ndarray
    orig_height: int
    orig_width: int
    conversion: str | None


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


_MODE_NAMES = {"L": "grayscale", "LA": "grayscale+alpha", "P": "palette", "PA": "palette+alpha",
               "1": "1-bit", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit",
               "F": "float"}


def describe_conversion(kind: str, mode: str) -> str | None:
    """What becoming an RGB JPEG takes for a `kind` file decoded in PIL `mode`; None for a
    plain RGB JPEG. The words go into the manifest, so they depend on nothing but the input."""
    if kind == "jpeg" and mode == "RGB":
        return None
    if mode == "RGB":
        return f"{kind.upper()} -> JPEG"
    what = f"{kind.upper()} {_MODE_NAMES.get(mode, mode)} -> RGB JPEG"
    return what + " (alpha composited over white)" if mode.endswith("A") else what


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


def _decode_pil(data, kind: str, min_short_side: int) -> _Decoded:
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
            mode = "PA" if image.mode == "P" and "transparency" in image.info else image.mode
            pixels = np.asarray(to_rgb(image))
        except Exception as err:  # ImportError (a LAB TIFF without ImageCms), TypeError, ...
            raise RejectedImage(f"undecodable {kind}: {describe_error(err)}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.size == 0:
        raise RejectedImage(f"undecodable {kind}: decoded to an array of shape {pixels.shape}")
    return _Decoded(pixels, orig_height, orig_width, describe_conversion(kind, mode))


_TURBO_MODES = {jpeg.TJCS_GRAY: "L"}  # RGB and YCbCr JPEGs decode to RGB as they are


def _decode(data, min_short_side: int) -> _Decoded:
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
    except OSError:
        # libjpeg-turbo's header call refuses valid sampling layouts it has no name for (PIL's
        # CMYK "4:2:0" samples only C at half size); libjpeg proper decodes them, or says why not.
        return _decode_pil(data, kind, min_short_side)
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
    return _Decoded(pixels, orig_height, orig_width, describe_conversion(kind, _TURBO_MODES.get(colorspace, "RGB")))


def decode_rgb(data, min_short_side: int) -> tuple[np.ndarray, int, int]:
    """RGB uint8 HWC decoded at the cheapest scale covering min_short_side, plus the original
    (height, width). Raises RejectedImage for empty, non-image, truncated, corrupt or
    implausible data (a header claiming more pixels than the budget or than the file can hold)."""
    decoded = _decode(data, min_short_side)
    return decoded.pixels, decoded.orig_height, decoded.orig_width


def prepare_image(data, prep_sizes: tuple[int, ...], quality: int, upscale: bool = False,
                  reencode: bool = False) -> PreparedImage:
    """One record per prep_size. An output whose size equals the original's is the source's own
    bytes when they are a baseline RGB JPEG, unless `reencode`."""
    reusable = None if reencode else _reusable_dims(data)
    if reusable is not None and all(target_dims(*reusable, s, upscale) == reusable for s in prep_sizes):
        _decode(data, 1)  # nothing to resize: decoded at the cheapest scale only to prove it whole
        same = ResizedImage(bytes(data), *reusable, stored_as_is=True)
        return PreparedImage(*reusable, (same,) * len(prep_sizes))
    decoded = _decode(data, max(prep_sizes))
    pixels, orig_height, orig_width = decoded.pixels, decoded.orig_height, decoded.orig_width
    for prep_size in prep_sizes:
        height, width = target_dims(orig_height, orig_width, prep_size, upscale)
        if max(height, width) > jpeg.MAX_JPEG_SIDE:  # a sliver: 40 x 70,000 px, say
            raise RejectedImage(f"cannot store: {orig_width}x{orig_height} at prep_size {prep_size} is "
                                f"{width}x{height}, over JPEG's {jpeg.MAX_JPEG_SIDE:,} px limit")
    image = Image.fromarray(pixels)
    outputs = []
    for prep_size in prep_sizes:
        height, width = target_dims(orig_height, orig_width, prep_size, upscale)
        if (height, width) == reusable:
            outputs.append(ResizedImage(bytes(data), height, width, stored_as_is=True))
            continue
        resized = image if (height, width) == pixels.shape[:2] else image.resize((width, height), RESAMPLE)
        outputs.append(ResizedImage(jpeg.encode_image(resized, quality), height, width))
    return PreparedImage(orig_height, orig_width, tuple(outputs), decoded.conversion)


def _reusable_dims(data) -> tuple[int, int] | None:
    """(height, width) of a JPEG worth keeping byte for byte where no resize is needed: RGB or
    YCbCr (nothing to convert), baseline (what training decodes fastest). Else None. The same
    answer with or without libturbojpeg, so a build's stored bytes do not depend on it."""
    if len(data) == 0 or jpeg.sniff(data) != "jpeg" or not jpeg.is_sequential_8bit(data):
        return None
    tj = jpeg.turbo()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tj is None:  # PIL reads the header only: "RGB" is a 3-component YCbCr/RGB JPEG
                with Image.open(io.BytesIO(data)) as image:
                    (width, height), three_components = image.size, image.mode == "RGB"
            else:
                width, height, _, colorspace = tj.decode_header(data)
                three_components = colorspace in (jpeg.TJCS_RGB, jpeg.TJCS_YCBCR)
    except Exception:  # noqa: BLE001  (_decode rejects it with the reason)
        return None
    if height <= 0 or width <= 0:
        return None  # _decode rejects it with the reason
    return (height, width) if three_components else None

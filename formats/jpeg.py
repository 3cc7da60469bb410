"""JPEG codec access shared by prep (decode, resize, encode) and train (decode toward a crop).

libjpeg-turbo through PyTurboJPEG 1.x is the fast decode path: DCT scaling (1/2, 1/4, 1/8 of the
size for a fraction of the work) straight into numpy. Encoding goes through PIL (whose JPEG codec is
libjpeg-turbo too) because prep's resized images are PIL images already. PyTurboJPEG cannot read
CMYK JPEGs, PNGs or other formats, so callers sniff the real format and fall back to PIL. If the
system library is missing, everything still works through PIL (slower); `codec_report` says which
libraries are active, because pillow-simd and Pillow both install as `PIL`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile

# Large progressive/optimized encodes into BytesIO fail with "Suspension not allowed here"
# unless PIL's output buffer can hold a whole scan.
ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, 16 << 20)

# Measured here with libjpeg-turbo 2.1: the 3/4, 5/8, 7/8 scales decode *slower* than full size
# (non-power-of-two IDCTs), so only these are worth using.
POW2_SCALES = ((1, 8), (1, 4), (1, 2), (1, 1))

# TurboJPEG colourspace codes (tjCS): CMYK and YCCK cannot be decoded to RGB by tjDecompress.
TJCS_RGB, TJCS_YCBCR, TJCS_GRAY, TJCS_CMYK, TJCS_YCCK = 0, 1, 2, 3, 4
TJPF_RGB, TJPF_CMYK = 0, 11

# Set (to anything but "" or "0") to run as if libturbojpeg were missing: the PIL fallback paths
# are then what runs, in this process and in the processes it starts (how the suite tests them).
HIDE_TURBOJPEG_ENV = "SHARDTRAIN_NO_TURBOJPEG"

# Checked against every source image's header before it is decoded. No camera makes more than
# ~100 Mpx; a larger header is a decompression bomb or a lie (memory and time grow with it).
MAX_IMAGE_PIXELS = 1 << 27
# Pixels a header may claim per byte of file. Huffman-coded JPEG data needs at least one bit per
# 8x8 block and component (<= 512 px per byte); PNG's deflate stops near 1032:1 (1-bit images:
# ~8,000 px per byte). Far above any real image, far below a 2 KB file claiming 40000x40000.
MAX_PIXELS_PER_BYTE = {"jpeg": 4096}
MAX_PIXELS_PER_BYTE_OTHER = 1 << 14
MAX_JPEG_SIDE = 65500  # libjpeg's limit on either side of an image it encodes

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff(data: bytes | memoryview) -> str | None:
    """The real format from magic bytes; extensions lie (ImageNet has a PNG named .JPEG)."""
    head = bytes(data[:12])
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def turbo_hidden() -> bool:
    return os.environ.get(HIDE_TURBOJPEG_ENV, "") not in ("", "0")


@functools.lru_cache(maxsize=1)
def turbo():
    """The process's TurboJPEG handle, or None when libturbojpeg is not installed (or hidden)."""
    if turbo_hidden():
        return None
    try:
        from turbojpeg import TurboJPEG

        return TurboJPEG()
    except (ImportError, OSError, RuntimeError):
        return None


def scaled_dim(length: int, scale: tuple[int, int]) -> int:
    """Output length of a DCT-scaled decode, rounded up as libjpeg does."""
    num, den = scale
    return -(-length * num // den)


def smallest_covering_scale(height: int, width: int, min_short_side: int) -> tuple[int, int]:
    """The smallest power-of-two DCT scale whose output's shorter side is >= min_short_side."""
    for scale in POW2_SCALES:
        if min(scaled_dim(height, scale), scaled_dim(width, scale)) >= min_short_side:
            return scale
    return (1, 1)


def implausible_size(kind: str, height: int, width: int, nbytes: int) -> str | None:
    """Why a header's claimed size cannot be a real image of `nbytes`, or None if it can."""
    pixels = height * width
    if pixels > MAX_IMAGE_PIXELS:
        return f"header claims {width}x{height} px, over the {MAX_IMAGE_PIXELS:,} px budget"
    limit = MAX_PIXELS_PER_BYTE.get(kind, MAX_PIXELS_PER_BYTE_OTHER)
    if pixels > limit * max(nbytes, 1):
        return (
            f"header claims {width}x{height} px in a {nbytes:,}-byte file: not a real image "
            f"(> {limit:,} px per byte)"
        )
    return None


# Start-of-frame markers of baseline (C0) and extended sequential (C1) Huffman JPEGs; every
# other SOFn is progressive, lossless or arithmetic-coded.
_SEQUENTIAL_HUFFMAN_SOF = (0xC0, 0xC1)
_OTHER_SOF = frozenset(range(0xC2, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4/C8/CC are DHT, JPG, DAC
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field


def is_sequential_8bit(data: bytes | memoryview) -> bool:
    """True for a baseline (or extended sequential Huffman) 8-bit JPEG: the kind a training
    decoder reads fastest. Progressive JPEGs decode ~2x slower, every epoch. Reads only the
    marker segments before the frame header, never past the end of `data`."""
    view = memoryview(data)
    if bytes(view[:2]) != b"\xff\xd8":
        return False
    position = 2
    while position + 4 <= len(view):
        if view[position] != 0xFF:
            return False
        marker = view[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in _SEQUENTIAL_HUFFMAN_SOF:
            return position + 4 < len(view) and view[position + 4] == 8  # sample precision
        # another frame type, or scan data before any frame
        if marker in _OTHER_SOF or marker == 0xDA:
            return False
        position += 2 + int.from_bytes(view[position + 2 : position + 4], "big")
    return False


def decode_turbo(data, scale: tuple[int, int] = (1, 1), pixel_format: int = TJPF_RGB) -> np.ndarray:
    """uint8 HWC (RGB by default); raises ValueError for corrupt data, OSError for undecodable.

    libjpeg reports lost data only as a warning and goes on (a JPEG cut short but ending in its
    EOI marker decodes to grey below the cut; a flipped byte desyncs the rest), and TurboJPEG
    keeps only the first warning of a decode. So any warning rejects the image: its pixels are
    not what was encoded, or a later, hidden warning may say so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels = turbo().decode(data, pixel_format=pixel_format, scaling_factor=scale)
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            raise ValueError(
                f"corrupt or truncated JPEG data (libjpeg: {str(warning.message).strip()})"
            )
    if pixels.size == 0:
        raise ValueError("JPEG decoded to an empty image")
    return pixels


def encode_image(image: Image.Image, quality: int) -> bytes:
    """Baseline 4:2:0 JPEG of an RGB PIL image, by the libjpeg(-turbo) inside PIL. From a PIL
    image (what a resize returns) this beats PyTurboJPEG's encoder: measured here, the image ->
    numpy copy it needs costs more than its quicker encode saves (sz/160 + sz/320: -13%)."""
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, subsampling=2)
    return out.getvalue()


def pil_variant() -> str:
    """'pillow-simd X' or 'Pillow X': whichever actually provides the imported PIL."""
    import PIL

    for dist in ("Pillow-SIMD", "pillow-simd"):
        try:
            if importlib.metadata.version(dist) == PIL.__version__:
                return f"pillow-simd {PIL.__version__}"
        except importlib.metadata.PackageNotFoundError:
            pass
    if ".post" in PIL.__version__:  # pillow-simd's version scheme
        return f"pillow-simd {PIL.__version__}"
    return f"Pillow {PIL.__version__}"


def codec_report() -> dict[str, str]:
    try:
        turbo_version = importlib.metadata.version("PyTurboJPEG")
    except importlib.metadata.PackageNotFoundError:
        turbo_version = "not installed"
    return {
        "pil": pil_variant(),
        "turbojpeg": f"PyTurboJPEG {turbo_version}"
        + (
            ""
            if turbo()
            else f" (hidden by {HIDE_TURBOJPEG_ENV}: PIL fallback)"
            if turbo_hidden()
            else " (libturbojpeg missing: PIL fallback)"
        ),
    }

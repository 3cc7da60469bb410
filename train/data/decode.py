"""Stored JPEG -> resized crop written into a uint8 batch slot on the CPU: the native C
backend (native/decode_native.c) or the pure-Python one."""

from __future__ import annotations

import functools
import io
import os
import threading

import numpy as np
import torch
import torch.nn.functional as F

from formats import jpeg
from train.data.crops import Box, box_within_scaled, dct_scale_for_box, scale_box, scaled_image_size

PYTHON_DECODE_ENV = "SHARDTRAIN_PY_DECODE"  # set to 1: the pure-Python backend, even if built
BACKENDS = ("native", "python")


@functools.lru_cache(maxsize=1)
def native_module():
    """train.data.decode_native, or None when it is not built, cannot load, or is switched off."""
    if os.environ.get(PYTHON_DECODE_ENV, "") not in ("", "0"):
        return None
    try:
        import train.data.decode_native as decode_native
    except ImportError:  # not built (no compiler or headers), or libjpeg missing at run time
        return None
    return decode_native


def backend() -> str:
    """'native' or 'python': which one `decode_crops_into` runs in this process."""
    return "native" if native_module() is not None else "python"


def decode_crops_into(
    out: np.ndarray,
    views: list,
    heights: np.ndarray,
    widths: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray,
) -> tuple[int, str] | None:
    """Fill `out` (N x H x W x 3 uint8, C-contiguous) with image i = `views[i]` (a JPEG of the
    stored size heights[i] x widths[i]) cropped to boxes[i] (top, left, height, width), resized
    to H x W and mirrored where flips[i].

    Returns None, or (position, reason) of the first image that cannot be decoded (corrupt
    data, or a size that is not the record table's): the caller names the record."""
    module = native_module()
    if module is not None:
        params = np.empty((len(views), module.NUM_PARAMS), dtype=np.int64)
        params[:, 0], params[:, 1], params[:, 2:6], params[:, 6] = heights, widths, boxes, flips
        failure = module.decode_crops(out, out.shape[1], out.shape[2], views, params)
        if failure is not None and not failure[1].startswith(("decoded size", "crop box")):
            failure = (
                failure[0],
                f"corrupt or truncated JPEG data (libjpeg: {failure[1]})",
            )  # as formats.jpeg
        return failure
    for position, data in enumerate(views):
        try:
            decode_crop_into(
                out[position],
                data,
                int(heights[position]),
                int(widths[position]),
                tuple(int(v) for v in boxes[position]),
                bool(flips[position]),
            )
        except (ValueError, OSError) as err:
            return position, str(err)
    return None


def decode_only(
    views: list,
    heights: np.ndarray,
    widths: np.ndarray,
    boxes: np.ndarray,
    out_height: int,
    out_width: int,
    region: bool,
) -> tuple[int, str] | None:
    """The native backend's decode step alone, for each image at the DCT scale its crop gets
    (benchmarks' decode-only floors): `region` decodes only the box's rows and columns as the
    loader does; else the whole image at that scale. Nothing is resized or kept. Needs the
    native backend (RuntimeError without it); returns as `decode_crops_into`."""
    module = native_module()
    if module is None:
        raise RuntimeError(
            "the decode-only floor needs train.data.decode_native (not built, or switched off)"
        )
    params = np.zeros((len(views), module.NUM_PARAMS), dtype=np.int64)
    params[:, 0], params[:, 1], params[:, 2:6] = heights, widths, boxes
    mode = module.MODE_REGION_ONLY if region else module.MODE_FULL_ONLY
    out = np.empty((len(views), out_height, out_width, 3), dtype=np.uint8)
    return module.decode_crops(out, out_height, out_width, views, params, mode)


# --- the pure-Python backend, one image at a time -------------------------------------------


# PyTurboJPEG reports libjpeg's warnings (corrupt data) through `warnings`, which formats.jpeg
# catches with warnings.catch_warnings: process-wide state, so one decode at a time per process
# (uncontended in worker processes; the native backend needs none of this).
_WARNINGS_LOCK = threading.Lock()


def decode_rgb(data, scale: tuple[int, int] = (1, 1)) -> np.ndarray:
    """RGB uint8 HWC at a DCT scale; ValueError/OSError on bad data. Without libturbojpeg, PIL
    decodes at full size (the caller asks for (1, 1) then: see `decode_scale`)."""
    if jpeg.turbo() is not None:
        with _WARNINGS_LOCK:
            return jpeg.decode_turbo(data, scale)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def decode_scale(box: Box, out_height: int, out_width: int) -> tuple[int, int]:
    if jpeg.turbo() is None:
        return (1, 1)
    return dct_scale_for_box(box[2], box[3], out_height, out_width)


def decode_crop_into(out, data, height: int, width: int, box: Box, flip: bool = False) -> None:
    """Decode `data` (stored `height` x `width`), resize `box` to fill `out` (uint8 HWC, a numpy
    array or tensor), mirror it if `flip`. (more: docs/DESIGN.md)"""
    out = torch.as_tensor(out)
    out_height, out_width = out.shape[0], out.shape[1]
    top, left, box_height, box_width = box
    if (
        min(top, left) < 0
        or min(box_height, box_width) < 1
        or top + box_height > height
        or left + box_width > width
    ):
        raise ValueError(f"crop box {tuple(box)} is outside the {height}x{width} image")
    num, den = decode_scale(box, out_height, out_width)
    pixels = decode_rgb(data, (num, den))
    expected = scaled_image_size(height, width, num, den)
    if pixels.shape[:2] != expected or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(
            f"decoded to {pixels.shape} at scale {num}/{den}, the record table says "
            f"{height}x{width} (expected {expected[0]}x{expected[1]}x3)"
        )
    if (num, den) == (1, 1):
        top, left, box_height, box_width = box
        crop = torch.from_numpy(pixels).permute(2, 0, 1)[
            None, :, top : top + box_height, left : left + box_width
        ]
        if (box_height, box_width) == (out_height, out_width):
            resized = crop[0]
        else:
            resized = F.interpolate(
                crop, size=(out_height, out_width), mode="bilinear", antialias=True
            )[0]
        resized = resized.permute(1, 2, 0)
    else:
        resized = _pil_resize_scaled(pixels, box, num, den, expected, out_height, out_width)
    out.copy_(resized.flip(1) if flip else resized)


def _pil_resize_scaled(
    pixels: np.ndarray, box: Box, num: int, den: int, scaled_size, out_height: int, out_width: int
) -> torch.Tensor:
    from PIL import Image

    scaled_box = scale_box(box, num, den, *scaled_size)
    top, left, box_height, box_width = box_within_scaled(box, num, den, scaled_box)
    sub = pixels[
        scaled_box[0] : scaled_box[0] + scaled_box[2], scaled_box[1] : scaled_box[1] + scaled_box[3]
    ]
    image = Image.fromarray(np.ascontiguousarray(sub))
    resized = image.resize(
        (out_width, out_height),
        Image.Resampling.BILINEAR,
        box=(left, top, left + box_width, top + box_height),
    )
    return torch.from_numpy(np.array(resized))

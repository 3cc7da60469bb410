"""Stored JPEG -> resized crop, written straight into a batch slot, on the CPU (GPU: gpu_decode).

CPU, per image (the loader's hot path, ~0.2-0.3 ms for a 128 px crop of a 160 px record):
decode with libjpeg-turbo at the smallest power-of-two DCT scale whose decoded box still has
the output's resolution (a large box costs a fraction of a full decode), crop, then resize only
the crop. At full scale the box is whole pixels and torch's uint8 antialiased bilinear kernel
does the resize (measured here ~2.5x faster than Pillow's, ~= PIL's filter to +-1); at a reduced
scale the box falls between decoded pixels, and PIL's `resize(box=...)` takes that float box
exactly. The flip is a copy with reversed columns into the slot.
"""
from __future__ import annotations

import io
import numpy as np
import torch
import torch.nn.functional as F

from formats import jpeg
from train.augment import Box, box_within_scaled, dct_scale_for_box, scale_box, scaled_image_size


def decode_rgb(data, scale: tuple[int, int] = (1, 1)) -> np.ndarray:
    """RGB uint8 HWC at a DCT scale; ValueError/OSError on bad data. Without libturbojpeg, PIL
    decodes at full size (the caller asks for (1, 1) then: see `decode_scale`)."""
    if jpeg.turbo() is not None:
        return jpeg.decode_turbo(data, scale)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def decode_scale(box: Box, out_height: int, out_width: int) -> tuple[int, int]:
    if jpeg.turbo() is None:
        return (1, 1)
    return dct_scale_for_box(box[2], box[3], out_height, out_width)


def decode_crop_into(out: torch.Tensor, data, height: int, width: int, box: Box, flip: bool = False) -> None:
    """Decode `data` (stored `height` x `width`), resize `box` to fill `out` (uint8 CHW), flip.

    Raises ValueError/OSError for undecodable data, ValueError when the decoded size is not the
    record table's (the bytes are not the image the table describes)."""
    out_height, out_width = out.shape[1], out.shape[2]
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
        crop = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, top : top + box_height, left : left + box_width]
        if (box_height, box_width) == (out_height, out_width):
            resized = crop[0]
        else:
            resized = F.interpolate(crop, size=(out_height, out_width), mode="bilinear", antialias=True)[0]
    else:
        resized = _pil_resize_scaled(pixels, box, num, den, expected, out_height, out_width)
    out.copy_(resized.flip(-1) if flip else resized)


def _pil_resize_scaled(pixels: np.ndarray, box: Box, num: int, den: int, scaled_size, out_height: int, out_width: int) -> torch.Tensor:
    from PIL import Image

    scaled_box = scale_box(box, num, den, *scaled_size)
    top, left, box_height, box_width = box_within_scaled(box, num, den, scaled_box)
    sub = pixels[scaled_box[0] : scaled_box[0] + scaled_box[2], scaled_box[1] : scaled_box[1] + scaled_box[3]]
    image = Image.fromarray(np.ascontiguousarray(sub))
    resized = image.resize(
        (out_width, out_height), Image.Resampling.BILINEAR, box=(left, top, left + box_width, top + box_height)
    )
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)

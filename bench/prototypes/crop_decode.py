"""Decode + crop + resize of one stored JPEG into one NHWC uint8 batch slot (prototype for issue 10).

One `CropDecoder` per worker thread: it owns a TurboJPEG handle and a scratch buffer sized for
the largest record, so nothing is allocated per image except PIL's small output image. Two resize
strategies, both antialiased bilinear, both running their C part without the GIL:

  "pil":   decode to RGBX (4 bytes/pixel, Pillow's own RGB layout) into the scratch buffer, wrap it
           with Image.frombuffer (zero-copy for RGBX), resize(box=...) with the float box of a DCT
           scaled decode, tobytes("raw", "RGB") and one memcpy into the slot.
  "torch": decode to RGB, torch's uint8 antialiased interpolate on the strided crop view, copy
           into the slot (what train/decode.py does at full scale today).

Measured per image on this machine (bench/prototypes/probe.py): the decode is ~160 us and every
microsecond around it counts, so: no allocation we can avoid (glibc's malloc trims and re-mmaps
~64 KB buffers freed per image: `keep_freed_memory` turns that off), PIL images mapped over the
scratch buffer cached per decoded size, an integer DCT-scale choice (train.augment's uses
Fractions, ~15 us), and flips done by PIL on the 128 px output (an indexed flip of the finished
batch cost ~60 us per image).
"""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prototypes import tjdecode
from train.augment import box_within_scaled, scale_box, scaled_image_size

TJPF_RGBX = 7
RESIZERS = ("pil", "torch")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(limit: int = 256 << 20) -> bool:
    """Make glibc keep freed memory up to `limit` instead of returning it to the kernel (and
    re-faulting it on the next allocation). Process-wide; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_TRIM_THRESHOLD, limit)) and bool(libc.mallopt(M_MMAP_THRESHOLD, limit))
    except (OSError, AttributeError):
        return False


def dct_scale(box_height: int, box_width: int, out_height: int, out_width: int) -> tuple[int, int]:
    """train.augment.dct_scale_for_box over the power-of-two scales, in integer arithmetic."""
    for den in (8, 4, 2):
        if box_height >= out_height * den and box_width >= out_width * den:
            return 1, den
    return 1, 1


class CropDecoder:
    def __init__(self, max_pixels: int, resize: str = "pil", flags: int = 0):
        if resize not in RESIZERS:
            raise ValueError(f"resize must be one of {RESIZERS}, got {resize!r}")
        self.resize, self.flags = resize, flags
        self.decompressor = tjdecode.Decompressor()
        self.scratch = np.empty(max_pixels * 4, dtype=np.uint8)
        self.scratch_address = self.scratch.ctypes.data
        self.lib = self.decompressor.lib
        self.mapped: dict[tuple[int, int], Image.Image] = {}  # (width, height) -> RGBX view of scratch

    def into(self, slot: np.ndarray, data, height: int, width: int, box, flip: bool = False) -> None:
        """Fill `slot` (out_height x out_width x 3 uint8, C-contiguous) from the record `data`
        (stored height x width) cropped to `box` = (top, left, box_height, box_width), mirrored
        if `flip`."""
        out_height, out_width = slot.shape[0], slot.shape[1]
        num, den = dct_scale(box[2], box[3], out_height, out_width)
        scaled_height, scaled_width = scaled_image_size(height, width, num, den)
        address, size = tjdecode.address_of(data)
        if self.resize == "pil":
            self._decode(address, size, scaled_width, scaled_height, TJPF_RGBX, 4)
            image = self.mapped.get((scaled_width, scaled_height))
            if image is None:
                image = self.mapped[scaled_width, scaled_height] = Image.frombuffer(
                    "RGBX", (scaled_width, scaled_height), self.scratch, "raw", "RGBX", 0, 1)
            if (num, den) == (1, 1):
                top, left, box_height, box_width = box
            else:
                top, left, box_height, box_width = box_within_scaled(
                    box, num, den, (0, 0, scaled_height, scaled_width))
            resized = image.resize((out_width, out_height), Image.Resampling.BILINEAR,
                                   box=(left, top, left + box_width, top + box_height))
            if flip:
                resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            slot.reshape(-1)[:] = np.frombuffer(resized.tobytes("raw", "RGB"), dtype=np.uint8)
            return
        self._decode(address, size, scaled_width, scaled_height, tjdecode.TJPF_RGB, 3)
        pixels = torch.from_numpy(self.scratch[: scaled_height * scaled_width * 3]).view(scaled_height, scaled_width, 3)
        top, left, box_height, box_width = scale_box(box, num, den, scaled_height, scaled_width)
        crop = pixels[top: top + box_height, left: left + box_width].permute(2, 0, 1)[None]
        resized = F.interpolate(crop, size=(out_height, out_width), mode="bilinear", antialias=True)[0]
        torch.from_numpy(slot).copy_((resized.flip(-1) if flip else resized).permute(1, 2, 0))

    def _decode(self, address: int, size: int, width: int, height: int, pixel_format: int, pixel_size: int) -> None:
        if height * width * pixel_size > self.scratch.size:
            raise ValueError(f"record of {height}x{width} exceeds the scratch buffer")
        status = self.lib.tjDecompress2(self.decompressor.handle, address, size, self.scratch_address, width,
                                        width * pixel_size, height, pixel_format,
                                        self.flags | tjdecode.TJFLAG_NOREALLOC)
        if status:
            self.decompressor.check(status)

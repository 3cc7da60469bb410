"""libjpeg-turbo's TurboJPEG 2.x API through ctypes: one decompressor handle per thread, the
header read once, the image decoded at a DCT scale straight into a caller's buffer.

Why not PyTurboJPEG 1.8.3's `decode`: it creates and destroys a decompressor per call
(tjInitDecompress/tjDestroy), reads the header through `byref` temporaries, allocates the output,
and reports warnings through `warnings.warn`, which callers must catch with
`warnings.catch_warnings()`, process-global state that is not thread-safe. The C calls themselves
run without the GIL (ctypes' CDLL releases it around every foreign call), so the difference is
the Python and allocation around them. Here the error text comes from tjGetErrorStr2 per handle.

Prototype for issue 10 (bench only; nothing in train/ or formats/ imports it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np

TJPF_RGB = 0
TJFLAG_FASTDCT = 2048
TJFLAG_FASTUPSAMPLE = 256
TJFLAG_NOREALLOC = 1024
TJERR_WARNING = 0
# As formats.jpeg: libjpeg reports these only as warnings, but they mean lost data.
FATAL_WARNINGS = ("Premature end", "contains no image", "missing SOS")


def load_library() -> ctypes.CDLL:
    path = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
    lib = ctypes.CDLL(path)
    c_int_p = ctypes.POINTER(ctypes.c_int)
    lib.tjInitDecompress.restype = ctypes.c_void_p
    lib.tjDestroy.argtypes = [ctypes.c_void_p]
    lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong,
                                        c_int_p, c_int_p, c_int_p, c_int_p]
    lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
    lib.tjGetErrorStr2.restype = ctypes.c_char_p
    lib.tjGetErrorCode.argtypes = [ctypes.c_void_p]
    return lib


_lib: ctypes.CDLL | None = None
_local = threading.local()


def library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = load_library()
    return _lib


class Decompressor:
    """One TurboJPEG decompressor; use one per thread (`for_thread()`), never share it."""

    def __init__(self):
        self.lib = library()
        self.handle = ctypes.c_void_p(self.lib.tjInitDecompress())
        if not self.handle.value:
            raise RuntimeError("tjInitDecompress failed")
        self._ints = (ctypes.c_int * 4)()
        base = ctypes.addressof(self._ints)
        self._int_ptrs = [ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int)) for i in range(4)]

    def __del__(self):
        if getattr(self, "handle", None) and self.handle.value:
            self.lib.tjDestroy(self.handle)

    def check(self, status: int) -> None:
        if status == 0:
            return
        message = self.lib.tjGetErrorStr2(self.handle).decode(errors="replace")
        if self.lib.tjGetErrorCode(self.handle) != TJERR_WARNING:
            raise OSError(message)
        if any(fatal in message for fatal in FATAL_WARNINGS):
            raise ValueError(f"truncated or empty JPEG data ({message})")

    def header(self, address: int, size: int) -> tuple[int, int]:
        """(height, width) of the JPEG at `address` (`size` bytes)."""
        self.check(self.lib.tjDecompressHeader3(self.handle, address, size, *self._int_ptrs))
        return self._ints[1], self._ints[0]

    def decode_into(self, address: int, size: int, out_address: int, width: int, pitch: int,
                    height: int, flags: int = 0) -> None:
        """Decode into `out_address` (RGB rows of `pitch` bytes), scaled to width x height, which
        must be a TJSCALED size of the image (the caller computes it from the record table)."""
        self.check(self.lib.tjDecompress2(self.handle, address, size, out_address, width, pitch, height,
                                           TJPF_RGB, flags | TJFLAG_NOREALLOC))


def for_thread() -> Decompressor:
    """This thread's decompressor (created on first use, destroyed with the thread's locals)."""
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = Decompressor()
    return decompressor


def address_of(buffer) -> tuple[int, int]:
    """(address, size) of a bytes/memoryview/ndarray without copying it."""
    array = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
    return array.__array_interface__["data"][0], array.nbytes


def decode(data, scale: tuple[int, int] = (1, 1), flags: int = 0) -> np.ndarray:
    """RGB uint8 HWC at a DCT scale, in a new array (for tests and the floor's warm-up)."""
    decompressor = for_thread()
    address, size = address_of(data)
    height, width = decompressor.header(address, size)
    num, den = scale
    scaled_height, scaled_width = -(-height * num // den), -(-width * num // den)
    out = np.empty((scaled_height, scaled_width, 3), dtype=np.uint8)
    decompressor.decode_into(address, size, out.ctypes.data, scaled_width, scaled_width * 3, scaled_height, flags)
    return out

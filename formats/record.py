"""The record schema, in one place: what every store holds per image and how it is keyed.

A dataset directory (`<split>-<prep_size>/`) holds the image bytes in a store (LMDB or msgpack
shards) plus a per-record table `records.npy` with the fields below, the source names in
`names.txt`, and `manifest.json`, written last. Store values are the re-encoded JPEG bytes and
nothing else, so a reader can hand a memoryview of the stored value straight to the decoder.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

FORMAT_NAME = "shardtrain"
# Bump when the layout or meaning of any file changes; readers refuse versions they don't know.
# 2: names.txt escapes what a line cannot hold (formats/names.py); 1 wrote names raw.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)

MANIFEST_FILE = "manifest.json"
RECORDS_FILE = "records.npy"
NAMES_FILE = "names.txt"

# label: class index in sorted-wnid order; height/width: the stored JPEG; orig_*: the source
# image before resizing (small originals are stored as they are, so height may be < prep_size);
# crc32: of the stored bytes.
RECORD_DTYPE = np.dtype(
    [
        ("label", "<i4"),
        ("height", "<u4"),
        ("width", "<u4"),
        ("orig_height", "<u4"),
        ("orig_width", "<u4"),
        ("crc32", "<u4"),
    ]
)

# One RECORD_DTYPE row as bytes, for writers appending rows one at a time (a numpy array per
# row costs ~10x more than this).
RECORD_STRUCT = struct.Struct("<iIIIII")
assert RECORD_STRUCT.size == RECORD_DTYPE.itemsize

KEY_DIGITS = 10


def encode_key(index: int) -> bytes:
    """Zero-padded so byte order equals index order (LMDB's append mode needs sorted keys)."""
    return b"%0*d" % (KEY_DIGITS, index)


def checksum(data: bytes | memoryview) -> int:
    """crc32: ~GB/s, and enough to catch flipped bytes and truncation (not an adversary)."""
    return zlib.crc32(data) & 0xFFFFFFFF

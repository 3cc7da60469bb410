"""What a JPEG carries besides its image, and how to drop it without touching the image.

A JPEG already at its stored size is kept byte for byte (a second generation only loses
quality), but only when it is just an image: nothing after its EOI marker (a JPEG+ZIP polyglot
hides an archive there) and at most METADATA_BUDGET bytes of APPn/COM segments (EXIF, ICC, XMP,
comments: 16 APP15 segments of 60 KB once made a 64 px record of 962 KB). Otherwise the extras
are cut losslessly: every frame, table and scan segment and the entropy-coded data are copied
as they are, so the pixels do not change. The decoders that read our records ignore what is
cut (colour profiles, EXIF orientation: the re-encode path drops them too); APP0 (JFIF) and
APP14 (Adobe) say how to read the colour components, so they stay when they are the usual few
bytes. Pure functions of the bytes; a layout this parser does not follow is re-encoded instead.
"""

from __future__ import annotations

import collections
import dataclasses
import re

# APPn/COM bytes a kept JPEG may carry: a JFIF header, a small EXIF block or an sRGB profile
# (~3 KB) fit; camera EXIF with a thumbnail (10-60 KB) does not: that costs as much as the
# image itself at prep sizes.
METADATA_BUDGET = 4096
# APP0 (JFIF) and APP14 (Adobe) tell the decoder whether the components are YCbCr or RGB.
DECODING_APPS = frozenset({0xE0, 0xEE})
MAX_DECODING_APP_BYTES = 64  # their standard sizes are 18 and 16 bytes
_METADATA = frozenset(range(0xE0, 0xF0)) | {0xFE}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field
_SOS, _EOI = 0xDA, 0xD9


@dataclasses.dataclass(frozen=True)
class JpegLayout:
    segments: tuple[tuple[int, int, int], ...]  # (marker, start, end) of every segment after SOI,
    # a scan's entropy-coded data included in its SOS segment
    end: int  # just past EOI


# In entropy-coded data a marker is 0xFF then a byte that is not a stuffed 0x00, a restart
# marker RST0-7 or another fill byte 0xFF (fill bytes before it stay with the scan). One regex
# search: 3.5 us for a 10 KB image, where a Python loop over its 0xFF bytes took 55 us (and
# `\xff+...`, backtracking, 300 us), against ~600 us for the image's whole pass-through.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _scan_end(data: bytes, position: int) -> int:
    """Where the entropy-coded data starting at `position` ends (its next marker), or -1."""
    found = _NEXT_MARKER.search(data, position)
    return -1 if found is None else found.start()


def parse_layout(data: bytes) -> JpegLayout | None:
    """The JPEG's segments up to EOI, or None where the layout is not one this follows."""
    if data[:2] != b"\xff\xd8":
        return None
    segments, position = [], 2
    while position + 2 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == _EOI:
            return JpegLayout(tuple(segments), position + 2)
        if marker in _STANDALONE:
            segments.append((marker, position, position + 2))
            position += 2
            continue
        if position + 4 > len(data):
            return None
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if end > len(data) or end < position + 4:
            return None
        if marker == _SOS:
            end = _scan_end(data, end)
            if end < 0:
                return None
        segments.append((marker, position, end))
        position = end
    return None


def _marker_name(marker: int) -> str:
    return f"APP{marker - 0xE0}" if 0xE0 <= marker <= 0xEF else "COM"


def _describe(metadata: list[tuple[int, int, int]]) -> str:
    counts = collections.Counter(_marker_name(marker) for marker, _, _ in metadata)
    kinds = ", ".join(
        f"{name} x{count}" if count > 1 else name for name, count in sorted(counts.items())
    )
    return f"{sum(end - start for _, start, end in metadata):,} bytes of metadata ({kinds})"


def keepable(data: bytes) -> tuple[bytes | None, str | None]:
    """(bytes to store, what was cut) for a JPEG that needs no resize: the bytes themselves and
    None when it is just an image; a losslessly cut copy and what was cut otherwise; (None,
    why) when it must be re-encoded instead. The words go into the manifest's conversions."""
    data = bytes(data)
    layout = parse_layout(data)
    if layout is None:
        return None, "JPEG marker layout not followed -> re-encoded"
    trailing = len(data) - layout.end
    metadata = [s for s in layout.segments if s[0] in _METADATA]
    metadata_bytes = sum(end - start for _, start, end in metadata)
    if not trailing and metadata_bytes <= METADATA_BUDGET:
        return data, None
    cut, dropped = [], []
    if trailing:
        cut.append(f"{trailing:,} bytes after EOI")
    kept = list(layout.segments)
    if metadata_bytes > METADATA_BUDGET:
        dropped = [s for s in metadata if s[0] not in DECODING_APPS]
        if any(s[0] in DECODING_APPS and s[2] - s[1] > MAX_DECODING_APP_BYTES for s in metadata):
            return (
                None,
                f"JPEG with an oversized APP0/APP14 segment ({_describe(metadata)}) -> re-encoded",
            )
        kept = [s for s in layout.segments if s not in dropped]
        cut.append(_describe(dropped) + f" over the {METADATA_BUDGET:,}-byte budget")
    stripped = b"".join([b"\xff\xd8", *(data[start:end] for _, start, end in kept), b"\xff\xd9"])
    return stripped, f"JPEG extras cut, image data kept as is: {' and '.join(cut)}"

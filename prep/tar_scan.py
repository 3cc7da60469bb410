"""A lean tar member scanner: (name, data offset, size) of every regular file, headers only.

Written by hand because it sits on the build's only sequential path: the main process walks
1.28M member headers of ImageNet's train tar while the workers decode, and tarfile's pure-Python
header parsing (TarInfo objects, checksums, pax machinery) cost ~0.1 ms per member there, a
third of a core at the rate two workers reach. This reads each 512-byte header, parses only
name, size and type, and seeks past the data. It understands ustar, GNU long names ('L') and pax
headers ('x', 'g'); anything it does not understand raises, and the tests check it against
tarfile on archives in every format tarfile writes.
"""
from __future__ import annotations

import os
from typing import Iterator

BLOCK = 512
REGULAR_TYPES = (b"0", b"\x00", b"7")
SKIPPED_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: no image data


class TarFormatError(ValueError):
    """Not a tar, or a damaged one."""


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\x00 ").lstrip(b" ")
    if field[:1] == b"\x80":  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field or b"0", 8)
    except ValueError:
        raise TarFormatError(f"bad number field {field!r}") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == unsigned


def _pax_records(data: bytes) -> dict[str, str]:
    records, position = {}, 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1: position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def scan_tar(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[str, int, int]]:
    """Yield (name, absolute data offset, size) for each regular file of the tar that lies at
    [start, end) of the open file `fd` (a nested tar is a span of its parent)."""
    position = start
    limit = os.fstat(fd).st_size if end is None else end
    long_name: str | None = None
    pax: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    while position < limit:  # tarfile also accepts an archive that ends without zero blocks
        header = os.pread(fd, BLOCK, position)
        if len(header) < BLOCK or position + BLOCK > limit:
            raise TarFormatError(f"truncated at byte {position}")
        if header == bytes(BLOCK):
            return  # end-of-archive marker
        if not _checksum_ok(header):
            raise TarFormatError(f"bad header checksum at byte {position}")
        kind = header[156:157]
        size = _octal(header[124:136])
        data_offset = position + BLOCK
        position = data_offset + (size + BLOCK - 1) // BLOCK * BLOCK
        if data_offset + size > limit:
            raise TarFormatError(f"member at byte {data_offset - BLOCK} runs past the end ({limit}): truncated")
        if kind in (b"L", b"x", b"g"):
            payload = os.pread(fd, size, data_offset)
            if kind == b"L":
                long_name = payload.rstrip(b"\x00").decode("utf-8", "surrogateescape")
            else:
                (pax if kind == b"x" else global_pax).update(_pax_records(payload))
            continue
        if kind in REGULAR_TYPES:
            fields = {**global_pax, **pax}
            name = header[:100].split(b"\x00", 1)[0]
            if header[257:262] == b"ustar" and header[345:346] != b"\x00":
                name = header[345:500].split(b"\x00", 1)[0] + b"/" + name
            text = fields.get("path") or long_name or name.decode("utf-8", "surrogateescape")
            if "size" in fields:
                size = int(fields["size"])
                position = data_offset + (size + BLOCK - 1) // BLOCK * BLOCK
            yield text, data_offset, size
        elif kind not in SKIPPED_TYPES:
            raise TarFormatError(f"unsupported tar member type {kind!r} at byte {data_offset - BLOCK}")
        long_name, pax = None, {}

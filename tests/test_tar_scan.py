"""prep.tar_scan agrees with tarfile on every format tarfile writes, and refuses damage."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from prep.tar_scan import TarFormatError, scan_tar


def _archive(path, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("some/dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for index, name in enumerate(["a.JPEG", "x" * 150 + ".JPEG", "dir/" * 40 + "deep.JPEG", "ünïcode.JPEG", "empty"]):
            data = os.urandom(index * 700 + (0 if name == "empty" else 1))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "a.JPEG"
        tar.addfile(link)
    return path


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_matches_tarfile(tmp_path, fmt):
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold the long names: use short ones
        path = tmp_path / "a.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for i in range(5):
                info = tarfile.TarInfo(f"n0{i}.JPEG")
                info.size = i * 1000
                tar.addfile(info, io.BytesIO(os.urandom(i * 1000)))
    else:
        path = _archive(tmp_path / "a.tar", fmt)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(scan_tar(fd)) == expected
        for name, offset, size in scan_tar(fd):
            with tarfile.open(path) as tar:
                assert os.pread(fd, size, offset) == tar.extractfile(name).read()
    finally:
        os.close(fd)


def test_nested_span(tmp_path):
    inner = tmp_path / "inner.tar"
    _archive(inner, tarfile.GNU_FORMAT)
    outer = tmp_path / "outer.tar"
    with tarfile.open(outer, "w") as tar:
        tar.add(inner, arcname="n01.tar")
        member = tar.getmember("n01.tar")
    fd = os.open(outer, os.O_RDONLY)
    try:
        (name, offset, size), = scan_tar(fd)
        assert name == "n01.tar"
        nested = list(scan_tar(fd, offset, offset + size))
        with tarfile.open(inner) as tar:
            assert [(n, o - offset, s) for n, o, s in nested] == [
                (m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    finally:
        os.close(fd)


def test_damage_is_refused(tmp_path):
    path = _archive(tmp_path / "a.tar", tarfile.GNU_FORMAT)
    blob = bytearray(path.read_bytes())
    blob[3] ^= 0x55  # inside the first header's name: checksum no longer matches
    path.write_bytes(bytes(blob))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(TarFormatError, match="checksum"):
            list(scan_tar(fd))
    finally:
        os.close(fd)
    (tmp_path / "text.tar").write_bytes(b"plain text, not a tar at all" * 40)
    fd = os.open(tmp_path / "text.tar", os.O_RDONLY)
    try:
        with pytest.raises(TarFormatError):
            list(scan_tar(fd))
    finally:
        os.close(fd)

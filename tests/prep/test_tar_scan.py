"""prep.tar_scan agrees with tarfile on every format tarfile writes, and refuses damage."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import pytest

from prep.tar_scan import TarFormatError, scan_members, scan_tar
from tests.fuzz import time_limit


def _archive(path, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("some/dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for index, name in enumerate(
            ["a.JPEG", "x" * 150 + ".JPEG", "dir/" * 40 + "deep.JPEG", "ünïcode.JPEG", "empty"]
        ):
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
    fd = os.open(outer, os.O_RDONLY)
    try:
        ((name, offset, size),) = scan_tar(fd)
        assert name == "n01.tar"
        nested = list(scan_tar(fd, offset, offset + size))
        with tarfile.open(inner) as tar:
            assert [(n, o - offset, s) for n, o, s in nested] == [
                (m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()
            ]
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


# ----------------------------------------------------------------- every member type tarfile reads


def _tarfile_files(path):
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    plain = [(m.name, m.offset_data, m.size) for m in members if m.isfile() and m.sparse is None]
    return plain, sorted(m.name for m in members if m.sparse is not None)


def _scanned(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        members = list(scan_members(fd))
    finally:
        os.close(fd)
    return (
        [(m.name, m.offset, m.size) for m in members if not m.sparse],
        sorted(m.name for m in members if m.sparse),
    )


def _info(name, kind=tarfile.REGTYPE, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    return info


def test_every_member_type_matches_tarfile(tmp_path):
    path = tmp_path / "types.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(_info("plain.JPEG", size=10), io.BytesIO(os.urandom(10)))
        # 'K'
        tar.addfile(
            _info("link-with-a-long-target", tarfile.SYMTYPE, linkname="t/" * 80 + "plain.JPEG")
        )
        tar.addfile(_info("hard", tarfile.LNKTYPE, linkname="plain.JPEG"))
        tar.addfile(_info("fifo", tarfile.FIFOTYPE))
        tar.addfile(_info("dev", tarfile.CHRTYPE))
        # a V7 directory: AREGTYPE and a trailing slash
        tar.addfile(_info("v7dir/", tarfile.AREGTYPE))
        tar.addfile(
            _info("contiguous.JPEG", tarfile.CONTTYPE, size=700), io.BytesIO(os.urandom(700))
        )
        # unknown: skipped
        tar.addfile(_info("volume-label", b"V", size=600), io.BytesIO(os.urandom(600)))
        tar.addfile(_info("last.JPEG", size=5), io.BytesIO(b"12345"))
    assert _scanned(path) == _tarfile_files(path)
    assert [n for n, _, _ in _scanned(path)[0]] == ["plain.JPEG", "contiguous.JPEG", "last.JPEG"]


def test_pax_global_and_solaris_headers_match_tarfile(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(
        path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}
    ) as tar:
        for name in ("a.JPEG", "ü" * 120 + ".JPEG", "b.JPEG"):
            tar.addfile(_info(name, size=3), io.BytesIO(b"abc"))
    blob = bytearray(path.read_bytes())
    at = blob.index(b"x", 156) // 512 * 512  # the first extended ('x') header: make it Solaris' 'X'
    assert blob[at + 156 : at + 157] == b"x"
    blob[at + 156] = ord("X")
    blob[at + 148 : at + 156] = b" " * 8
    blob[at + 148 : at + 156] = b"%06o\0 " % sum(blob[at : at + 512])
    path.write_bytes(bytes(blob))
    assert _scanned(path) == _tarfile_files(path) and len(_scanned(path)[0]) == 3


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write sparse members")
@pytest.mark.parametrize(
    "options", [["--format=gnu"], ["--format=pax"], ["--format=pax", "--sparse-version=0.1"]]
)
def test_sparse_members_are_reported_and_the_walk_stays_in_step(tmp_path, options):
    holes = tmp_path / "holes.bin"
    with open(holes, "wb") as f:
        f.truncate(1 << 20)
        f.seek(500_000)
        f.write(b"data")
    (tmp_path / "after.JPEG").write_bytes(b"after")
    path = tmp_path / "sparse.tar"
    subprocess.run(
        [
            "tar",
            "--sparse",
            *options,
            "-cf",
            str(path),
            "-C",
            str(tmp_path),
            "holes.bin",
            "after.JPEG",
        ],
        check=True,
    )
    plain, sparse = _scanned(path)
    assert (plain, len(sparse)) == (_tarfile_files(path)[0], 1)
    assert [n for n, _, _ in plain] == ["after.JPEG"]


# ----------------------------------------------------------------- damage: one clear error, fast


def _block(name: bytes, size: int, kind: bytes, size_field: bytes | None = None) -> bytes:
    header = bytearray(512)
    header[: len(name)] = name
    header[100:108] = b"0000644\0"
    header[124:136] = size_field if size_field is not None else b"%011o\0" % size
    header[136:148] = b"%011o\0" % 0
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _member(name: bytes, payload: bytes, kind: bytes = b"0") -> bytes:
    return _block(name, len(payload), kind) + payload + bytes(-len(payload) % 512)


def _pax_then_file(records: bytes) -> bytes:
    return _member(b"PaxHeader", records, b"x") + _member(b"a.JPEG", b"x" * 100) + bytes(1024)


@pytest.mark.parametrize(
    "archive, message",
    [
        # a length of 0 made the old scanner loop forever
        (_pax_then_file(b"0 path=x\n"), "bad pax record"),
        (_pax_then_file(b"abc path=x\n" + b"9" * 20), "bad pax record|not followed"),
        (_pax_then_file(b"99 path=x\n"), "bad pax record"),  # runs past the header's data
        (_pax_then_file(b"21 size=999999999999\n"), "runs past the end"),
        (_pax_then_file(b"13 size=12ab\n"), "bad pax size"),
        (
            _member(b"PaxHeader", b"", b"x")[:124] + b"77777777777\0" + bytes(388) + bytes(1024),
            "checksum|claims",
        ),
        (_block(b"big", 0, b"x", b"\x80" + b"\x00" * 4 + b"\x7f" * 7) + bytes(1024), "claims"),
        (_block(b"neg", 0, b"0", b"\xff" * 12) + bytes(1024), "negative size"),
        (_block(b"bad", 0, b"0", b"12x4\0       ") + bytes(1024), "bad size field"),
        (_member(b"././@LongLink", b"name.JPEG", b"L") + bytes(1024), "not followed by a member"),
        (_member(b"././@LongLink", b"name.JPEG", b"L"), "not followed by a member"),
        (_member(b"a.JPEG", b"x" * 2000)[:1500], "runs past the end"),
        (_member(b"a.JPEG", b"x" * 10) + b"\x01" * 300, "truncated"),
    ],
)
def test_malformed_headers_are_damage_not_hangs_or_tracebacks(tmp_path, archive, message):
    path = tmp_path / "bad.tar"
    path.write_bytes(archive)
    fd = os.open(path, os.O_RDONLY)
    try:
        with time_limit(5), pytest.raises(TarFormatError, match=message):
            list(scan_members(fd))
    finally:
        os.close(fd)


def test_pax_size_override_is_applied(tmp_path):
    path = tmp_path / "pax-size.tar"
    payload = b"y" * 1500
    header = _block(b"a.JPEG", 0, b"0")  # the ustar size says 0; pax says 1500
    path.write_bytes(
        _member(b"PaxHeader", b"13 size=1500\n", b"x")
        + header
        + payload
        + bytes(-1500 % 512)
        + _member(b"b.JPEG", b"zz")
        + bytes(1024)
    )
    assert _scanned(path) == _tarfile_files(path)
    assert [(n, s) for n, _, s in _scanned(path)[0]] == [("a.JPEG", 1500), ("b.JPEG", 2)]

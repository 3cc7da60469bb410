"""Source names survive names.txt exactly (non-UTF-8 bytes, newlines, backslashes), old
format_version 1 files still read, and odd names never reach a terminal raw."""

from __future__ import annotations

import io
import tarfile

import pytest
from typer.testing import CliRunner

from formats.manifest import load_names, read_manifest
from formats.names import escape_name, names_line, parse_names, unescape_name
from prep.build import BuildConfig, build
from prep.cli import app
from prep.verify import verify
from tests.conftest import jpeg_bytes

ODD_NAMES = [
    "n01440764_10026.JPEG",
    b"caf\xe9.JPEG".decode("utf-8", "surrogateescape"),  # latin-1 bytes from an old tar
    "line\nbreak.JPEG",
    "carriage\rreturn.JPEG",
    "back\\slash\\x41.JPEG",  # looks like an escape: must come back as written
    "tab\there.JPEG",
    "esc\x1b[31mred.JPEG",
    "ünïcødé 写真 🙂.JPEG",
    "",
]


def test_every_name_round_trips_and_the_file_is_utf8_text():
    data = b"".join(names_line(name) for name in ODD_NAMES)
    assert parse_names(data, 2) == ODD_NAMES
    text = data.decode("utf-8")  # strict: valid UTF-8 whatever the names
    assert text.count("\n") == len(ODD_NAMES)
    assert names_line("n01440764_10026.JPEG") == b"n01440764_10026.JPEG\n"  # plain names stay plain
    for name in ODD_NAMES:
        shown = escape_name(name)
        assert shown.isprintable() and unescape_name(shown) == name


def test_format_version_1_names_still_read():
    old = "plain.JPEG\n".encode() + b"caf\xe9.JPEG\n" + b"back\\slash.JPEG\n"
    assert parse_names(old, 1) == [
        "plain.JPEG",
        b"caf\xe9.JPEG".decode("utf-8", "surrogateescape"),
        "back\\slash.JPEG",
    ]


def _train_tar_with_names(path, names):
    """A train tar whose class tar holds members with exactly these names (raw header bytes)."""
    inner = io.BytesIO()
    with tarfile.open(
        fileobj=inner,
        mode="w",
        format=tarfile.GNU_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for index, name in enumerate(names):
            data = jpeg_bytes(40, 60, seed=index) if index % 3 else b"not an image"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w") as outer:
        info = tarfile.TarInfo("n01000000.tar")
        info.size = len(inner.getvalue())
        outer.addfile(info, io.BytesIO(inner.getvalue()))


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_odd_member_names_build_verify_and_match_the_source(tmp_path, store):
    names = [n for n in ODD_NAMES if n and "/" not in n]
    src = tmp_path / "src"
    src.mkdir()
    _train_tar_with_names(src / "ILSVRC2012_img_train.tar", names)
    manifest = build(
        BuildConfig(src, tmp_path / "out", "train", (32,), store, workers=0, quiet=True)
    ).manifests[32]
    dataset = tmp_path / "out" / "train-32"
    stored = load_names(dataset, read_manifest(dataset))
    rejected = [r["name"] for r in manifest.rejects]
    # every third one is not an image
    assert sorted(stored + rejected) == sorted(names) and rejected
    report = verify(dataset, workers=1, src_dir=src, quiet=True)
    assert report.ok, report.faults
    result = CliRunner().invoke(app, ["info", str(dataset)])
    assert (
        result.exit_code == 0
        and "\x1b" not in result.output
        and "esc\\u001b[31mred.JPEG" in result.output
    )

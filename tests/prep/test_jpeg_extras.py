"""Pass-through keeps only JPEGs that are just an image: bytes after EOI (a JPEG+ZIP polyglot)
and metadata over the budget (16 APP15 segments of 60 KB) are cut losslessly, the pixels stay
the same, and the cut is listed as a conversion; a JPEG with a little metadata is still kept
byte for byte; what the cutter cannot follow is re-encoded, and listed."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from formats.manifest import read_manifest
from prep.build import BuildConfig, build
from prep.jpeg_extras import METADATA_BUDGET, keepable, parse_layout
from prep.resize import prepare_image
from prep.verify import verify
from tests.conftest import jpeg_bytes
from tests.prep.test_build import dataset_bytes


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def with_segments(data: bytes, *segments: bytes) -> bytes:
    """`data` with segments inserted right after SOI (where EXIF, ICC and the like sit)."""
    return data[:2] + b"".join(segments) + data[2:]


def zip_archive() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("payload.txt", "x" * 20_000)
    return out.getvalue()


def test_layout_ends_at_eoi():
    data = jpeg_bytes(64, 80)
    assert parse_layout(data).end == len(data)
    assert parse_layout(data + zip_archive()).end == len(data)
    assert parse_layout(data[:-2]) is None and parse_layout(b"not a jpeg") is None
    # fill bytes before EOI, a restart marker and a stuffed 0xFF00 inside the scan: not its end
    sos = data.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    odd = (
        data[: scan_start + 5]
        + b"\xff\xd3\xff\x00"
        + data[scan_start + 5 : -2]
        + b"\xff\xff\xff\xd9"
    )
    layout = parse_layout(odd)
    assert layout.end == len(odd) and layout.segments[-1][2] == len(odd) - 2


def test_a_polyglot_loses_its_archive_and_is_listed():
    data = jpeg_bytes(64, 80, seed=1)
    polyglot = data + zip_archive()
    assert zipfile.is_zipfile(io.BytesIO(polyglot))
    prepared = prepare_image(polyglot, (64,), 90)
    stored = prepared.outputs[0]
    assert stored.jpeg == data and not stored.stored_as_is  # the image's own bytes, not a re-encode
    assert (
        prepared.conversion
        == f"JPEG extras cut, image data kept as is: {len(polyglot) - len(data):,} bytes after EOI"
    )


def test_metadata_over_the_budget_is_cut_and_the_pixels_stay():
    data = jpeg_bytes(64, 96, seed=2)
    bloated = with_segments(data, *[segment(0xEF, bytes([i]) * 60_000) for i in range(16)])
    assert len(bloated) > 960_000
    prepared = prepare_image(bloated, (64,), 90)
    stored = prepared.outputs[0].jpeg
    assert len(stored) == len(data)
    assert np.array_equal(pixels(stored), pixels(bloated))
    assert "960,064 bytes of metadata (APP15 x16) over the 4,096-byte budget" in prepared.conversion


def test_a_little_metadata_is_kept_byte_for_byte():
    data = with_segments(
        jpeg_bytes(64, 70, seed=3),
        segment(0xE1, b"Exif\x00\x00" + b"\x01" * 500),
        segment(0xFE, b"a comment"),
    )
    prepared = prepare_image(data, (64,), 90)
    assert prepared.outputs[0].jpeg == data and prepared.outputs[0].stored_as_is
    assert prepared.conversion is None
    assert keepable(data) == (data, None)


def test_metadata_is_counted_against_the_budget_all_together():
    data = jpeg_bytes(64, 70, seed=4)
    one = segment(0xE1, b"\x02" * (METADATA_BUDGET // 2))
    assert keepable(with_segments(data, one))[1] is None
    kept, cut = keepable(with_segments(data, one, one, one))
    assert kept == data and "(APP1 x3)" in cut


def test_what_cannot_be_cut_cleanly_is_reencoded_and_listed():
    """A JFIF segment carrying a 40x40 RGB thumbnail (4.8 KB): APP0 is needed, too big to keep."""
    plain = jpeg_bytes(64, 70, seed=6)
    assert plain[2:4] == b"\xff\xe0" and plain[4:6] == b"\x00\x10"  # PIL's 18-byte JFIF segment
    jfif = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01" + bytes([40, 40]) + b"\x80" * (40 * 40 * 3)
    data = with_segments(plain[:2] + plain[20:], segment(0xE0, jfif))
    prepared = prepare_image(data, (64,), 90)
    assert not prepared.outputs[0].stored_as_is and prepared.outputs[0].jpeg != data
    assert "oversized APP0/APP14" in prepared.conversion and prepared.conversion.endswith(
        "-> re-encoded"
    )
    assert (prepared.outputs[0].height, prepared.outputs[0].width) == (64, 70)


def test_an_output_that_is_resized_anyway_lists_no_cut():
    polyglot = jpeg_bytes(96, 120, seed=7) + zip_archive()
    prepared = prepare_image(polyglot, (48,), 90)
    assert prepared.conversion is None and not prepared.outputs[0].stored_as_is


def test_a_build_stores_clean_records_and_lists_the_cuts(tmp_path: Path):
    clean = {f"n00/n00_{i}.JPEG": jpeg_bytes(64, 80 + i, seed=i) for i in range(3)}
    dirty = {
        "n01/n01_zip.JPEG": jpeg_bytes(64, 90, seed=8) + zip_archive(),
        "n01/n01_app15.JPEG": with_segments(
            jpeg_bytes(64, 90, seed=9), *[segment(0xEF, b"\x00" * 60_000) for _ in range(16)]
        ),
    }
    for relative, data in {**clean, **dirty}.items():
        path = tmp_path / "src" / "train" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    build(
        BuildConfig(
            tmp_path / "src", tmp_path / "out", "train", (64,), "msgpack", workers=0, quiet=True
        )
    )
    dataset_dir = tmp_path / "out" / "train-64"
    manifest = read_manifest(dataset_dir)
    assert manifest.build["num_stored_as_is"] == 3
    assert sorted(c["name"] for c in manifest.conversions) == ["n01_app15.JPEG", "n01_zip.JPEG"]
    assert max(map(len, dataset_bytes(dataset_dir))) < 20_000  # was 962 KB stored for a 64 px image
    assert verify(dataset_dir, workers=1, quiet=True).ok

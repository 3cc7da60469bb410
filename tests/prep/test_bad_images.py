"""Hostile and damaged images: each is rejected with its reason, before any big allocation, and
whatever one image does, the rest of the build goes on (unless --strict)."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from formats import jpeg
from prep.build import BuildConfig, build
from prep.partial import BuildError
from prep.resize import RejectedImage, prepare_image
from prep.verify import verify
from tests.conftest import jpeg_bytes, write_train_tar

needs_turbo = pytest.mark.skipif(
    jpeg.turbo() is None, reason="PIL does not surface libjpeg's warnings"
)


def cut_keeping_eoi(data: bytes, keep: float = 0.5) -> bytes:
    """Entropy data stops early but the file still ends in its EOI marker (libjpeg: "Corrupt
    JPEG data: premature end of data segment", and grey below the cut)."""
    return data[: int(len(data) * keep)] + b"\xff\xd9"


def with_jpeg_dims(data: bytes, height: int, width: int) -> bytes:
    """The same JPEG with its SOF header claiming another size."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def png_claiming(height: int, width: int) -> bytes:
    """A tiny, valid-looking PNG whose IHDR claims height x width (CRC fixed up)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")
    data = bytearray(out.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def rejected_reason(data: bytes) -> str:
    with pytest.raises(RejectedImage) as caught:
        prepare_image(data, (64,), 90)
    return caught.value.reason


@needs_turbo
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_cut_short_but_ending_in_eoi_is_rejected(mode):
    reason = rejected_reason(cut_keeping_eoi(jpeg_bytes(300, 400, mode=mode)))
    assert "corrupt" in reason and "premature end of data segment" in reason.lower()


@needs_turbo
@pytest.mark.parametrize(
    "damage",
    [
        # "extraneous bytes before marker 0xd9": a desynced stream says only this
        lambda d: d[:-2] + b"junk" + d[-2:],
        lambda d: d[:-2],  # no EOI: "premature end of JPEG file"
        lambda d: d[: len(d) // 2] + d[len(d) // 2 + 300 :],  # a hole in the entropy data
    ],
)
def test_every_libjpeg_warning_rejects(damage):
    assert "corrupt or truncated JPEG data (libjpeg: " in rejected_reason(
        damage(jpeg_bytes(300, 400))
    )


@needs_turbo
def test_warnings_from_the_shared_decoder_reject_for_train_too():
    """formats.jpeg.decode_turbo is train's decoder as well: it raises, never returns grey."""
    data = cut_keeping_eoi(jpeg_bytes(300, 400))
    with pytest.raises(ValueError, match="(?i)premature end"):
        jpeg.decode_turbo(data)
    assert jpeg.decode_turbo(jpeg_bytes(300, 400)).shape == (300, 400, 3)


@pytest.mark.parametrize(
    "height, width, what",
    [
        (40000, 40000, "budget"),  # 1.6 Gpx: over the pixel budget
        (8000, 8000, "px per byte"),  # within the budget, but not in a few KB
    ],
)
def test_jpeg_header_claiming_a_huge_size_is_rejected_before_decoding(height, width, what):
    data = with_jpeg_dims(jpeg_bytes(48, 64), height, width)
    assert len(data) < 8000
    reason = rejected_reason(data)
    assert reason.startswith("implausible jpeg: ")
    # PIL (no libturbojpeg) refuses 1.6 Gpx at open, first
    if "DecompressionBombError" not in reason:
        assert what in reason and f"{width}x{height}" in reason


@pytest.mark.parametrize("side", [30000, 12000, 3000])  # over PIL's bomb limit, over ours, per byte
def test_png_header_claiming_a_huge_size_is_rejected(side):
    assert rejected_reason(png_claiming(side, side)).startswith("implausible png: ")


def test_big_but_plausible_images_still_pass():
    flat = np.full((2000, 3000, 3), 200, np.uint8)  # a flat photo compresses very well
    out = io.BytesIO()
    Image.fromarray(flat).save(out, "JPEG", quality=75)
    prepared = prepare_image(out.getvalue(), (64,), 90)
    assert (prepared.orig_height, prepared.orig_width) == (2000, 3000)


def test_lab_tiff_named_jpeg_is_rejected_with_exception_type():
    """pillow-simd has no colour management: converting LAB raises ImportError, not OSError."""
    out = io.BytesIO()
    Image.new("LAB", (64, 48), (50, 10, 10)).save(out, "TIFF")
    try:
        prepared = prepare_image(out.getvalue(), (32,), 90)
    except RejectedImage as rejected:
        assert re.match(r"undecodable tiff: [A-Za-z]+Error: ", rejected.reason), rejected.reason
    else:  # a PIL that can convert LAB makes a good image of it
        assert prepared.outputs[0].height == 32


@pytest.mark.parametrize(
    "error",
    [
        TypeError("bad tile"),
        IndexError("list index out of range"),
        MemoryError(),
        RuntimeError("plugin bug"),
    ],
)
def test_any_decoder_exception_is_a_reject_named_by_type(monkeypatch, error):
    def broken_open(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image, "open", broken_open)
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")  # PNG: always PIL's path
    reason = rejected_reason(out.getvalue())
    assert reason.startswith(f"undecodable png: {type(error).__name__}")


def _source_with(tmp_path, members):
    src = tmp_path / "src"
    src.mkdir()
    good = jpeg_bytes(120, 160)
    write_train_tar(
        src / "ILSVRC2012_img_train.tar",
        {"n01000000": [("good_1.JPEG", good), *members, ("good_2.JPEG", good)]},
    )
    return src


def test_one_member_raising_anything_is_rejected_and_the_build_goes_on(tmp_path, monkeypatch):
    import prep.build

    original = prep.build.prepare_image

    def prepare_or_explode(data, *args):
        if data == b"explode":
            raise KeyError("a bug in some decoder")
        return original(data, *args)

    monkeypatch.setattr(prep.build, "prepare_image", prepare_or_explode)
    src = _source_with(tmp_path, [("odd.JPEG", b"explode")])
    manifest = build(
        BuildConfig(src, tmp_path / "out", "train", (64,), "msgpack", workers=0, quiet=True)
    ).manifests[64]
    assert manifest.count == 2
    assert manifest.rejects == [
        {"name": "odd.JPEG", "reason": "cannot prepare: KeyError: 'a bug in some decoder'"}
    ]
    with pytest.raises(BuildError, match="--strict: odd.JPEG: cannot prepare: KeyError"):
        build(
            BuildConfig(
                src,
                tmp_path / "strict",
                "train",
                (64,),
                "msgpack",
                workers=0,
                strict=True,
                quiet=True,
            )
        )


def test_hostile_members_in_one_build_are_all_listed(tmp_path):
    out = io.BytesIO()
    Image.new("LAB", (64, 48), (50, 10, 10)).save(out, "TIFF")
    members = [
        ("bomb.JPEG", with_jpeg_dims(jpeg_bytes(48, 64), 40000, 40000)),
        ("lab.JPEG", out.getvalue()),
        ("png_bomb.JPEG", png_claiming(30000, 30000)),
    ]
    if jpeg.turbo() is not None:
        members.append(("cut.JPEG", cut_keeping_eoi(jpeg_bytes(300, 400))))
    src = _source_with(tmp_path, members)
    manifest = build(
        BuildConfig(src, tmp_path / "out", "train", (64,), "lmdb", workers=1, quiet=True)
    ).manifests[64]
    rejected = {r["name"] for r in manifest.rejects}
    # LAB converts where ImageCms exists
    assert rejected >= {name for name, _ in members} - {"lab.JPEG"}
    assert manifest.count == 2 + len(members) - len(rejected)


@needs_turbo
@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_verify_flags_a_stored_record_that_decodes_with_a_warning(tmp_path, monkeypatch, store):
    """A dataset made by a build that stored a grey-padded image (as older builds did)."""
    import prep.build
    from prep.resize import PreparedImage, ResizedImage

    original = prep.build.prepare_image
    damaged = cut_keeping_eoi(jpeg_bytes(64, 80))

    def store_damaged(data, *args):
        prepared = original(data, *args)
        if prepared.orig_width == 160:  # the second member only
            return PreparedImage(64, 80, (ResizedImage(damaged, 64, 80),))
        return prepared

    monkeypatch.setattr(prep.build, "prepare_image", store_damaged)
    good = jpeg_bytes(120, 150)
    src = tmp_path / "src"
    src.mkdir()
    write_train_tar(
        src / "ILSVRC2012_img_train.tar",
        {"n01000000": [("a.JPEG", good), ("b.JPEG", jpeg_bytes(120, 160)), ("c.JPEG", good)]},
    )
    build(BuildConfig(src, tmp_path / "out", "train", (64,), store, workers=0, quiet=True))
    report = verify(tmp_path / "out" / "train-64", workers=1, quiet=True)
    assert not report.ok and len(report.faults) == 1
    assert (
        report.faults[0].startswith("record 1 (b.JPEG): does not decode")
        and "premature end" in report.faults[0]
    )


def test_a_sliver_too_long_for_jpeg_is_rejected_not_a_crash():
    out = io.BytesIO()
    Image.new("RGB", (70000, 2), (255, 255, 255)).save(out, "PNG")
    reason = rejected_reason(out.getvalue())
    assert reason.startswith("cannot store: 70000x2") and "65,500 px limit" in reason

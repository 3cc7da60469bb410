"""Time-bounded fuzzing (a few seconds each in CI): mutated images through prep's whole per-image
path, mutated tars through the scanner against tarfile. `python -m tests.fuzz 300` hunts longer."""

from __future__ import annotations

import functools
import io
import itertools
import os
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from prep.resize import PreparedImage, RejectedImage, prepare_image, target_dims
from prep.tar_scan import TarFormatError, scan_members
from tests.fuzz import fix_tar_checksums, mutate, run_cases

IMAGE_BUDGET_S = 3.0
TAR_BUDGET_S = 3.0


@functools.lru_cache(maxsize=1)
def image_seeds() -> list[bytes]:
    """Small valid inputs of every kind prep reads (what the sniffer routes to each decoder)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8))
    seeds = []

    def save(image, fmt, **kwargs):
        out = io.BytesIO()
        image.save(out, fmt, **kwargs)
        seeds.append(out.getvalue())

    save(rgb, "JPEG", quality=90)
    save(rgb, "JPEG", quality=75, progressive=True)
    save(rgb, "JPEG", quality=95, subsampling=0)
    save(rgb.convert("L"), "JPEG")
    save(rgb.convert("CMYK"), "JPEG")
    save(rgb, "PNG")
    save(rgb.convert("P"), "PNG", transparency=3)
    save(rgb.convert("RGBA"), "PNG")
    save(rgb.convert("I;16"), "PNG")
    save(rgb.convert("P"), "GIF")
    save(rgb, "BMP")
    save(rgb, "TIFF")
    try:
        save(rgb, "WEBP")
    except (KeyError, OSError):  # a PIL built without WebP
        pass
    return seeds


def check_image_case(seed: int) -> None:
    rng = random.Random(seed)
    original = rng.choice(image_seeds())
    data = mutate(original, rng, protect=rng.choice((0, 4, 12)))
    prep_sizes = rng.choice(((32,), (24, 48), (64,)))
    upscale = rng.random() < 0.3
    try:
        prepared = prepare_image(data, prep_sizes, 90, upscale)
    except RejectedImage as rejected:
        assert rejected.reason, f"seed {seed}: empty reason"
        return
    except Exception as err:  # anything else escaping is the bug this test hunts
        raise AssertionError(f"seed {seed}: {type(err).__name__}: {err}") from err
    assert isinstance(prepared, PreparedImage)
    for prep_size, output in zip(prep_sizes, prepared.outputs):
        expected = target_dims(prepared.orig_height, prepared.orig_width, prep_size, upscale)
        assert (output.height, output.width) == expected, f"seed {seed}"
        with Image.open(io.BytesIO(output.jpeg)) as stored:
            assert stored.size == (output.width, output.height) and stored.mode == "RGB", (
                f"seed {seed}"
            )


def fuzz_images(budget_s: float, first_seed: int = 0) -> int:
    return run_cases(itertools.count(first_seed), budget_s, check_image_case)


# slow: the quick tier covers the same code on chosen inputs (test_resize, test_bad_images)
@pytest.mark.slow
def test_fuzz_image_path():
    assert fuzz_images(IMAGE_BUDGET_S) > 50


@functools.lru_cache(maxsize=1)
def tar_seeds() -> list[bytes]:
    """Small archives in every format tarfile writes, with long names, links, dirs, pax headers."""
    seeds = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        out = io.BytesIO()
        extra = {"pax_headers": {"comment": "global"}} if fmt == tarfile.PAX_FORMAT else {}
        with tarfile.open(fileobj=out, mode="w", format=fmt, **extra) as tar:
            for index, name in enumerate(["a.JPEG", "d/" * 30 + "b.JPEG", "ü.JPEG", "e"]):
                if fmt == tarfile.USTAR_FORMAT and len(name) > 99:
                    name = "short.JPEG"
                info = tarfile.TarInfo(name)
                info.size = index * 300
                tar.addfile(info, io.BytesIO(bytes(range(256)) * 4))
            link = tarfile.TarInfo("l")
            link.type, link.linkname = (
                tarfile.SYMTYPE,
                "x" * (90 if fmt == tarfile.USTAR_FORMAT else 150),
            )
            tar.addfile(link)
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        seeds.append(out.getvalue())
    return seeds


def _tarfile_view(data: bytes):
    """tarfile's (name, offset, size) of the regular files, or None if it refuses the archive."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = tar.getmembers()
    except Exception:  # tarfile raises many kinds on damage; then there is nothing to compare
        return None
    return [(m.name, m.offset_data, m.size) for m in members if m.isfile() and m.sparse is None]


def check_tar_case(seed: int, fd: int) -> None:
    rng = random.Random(seed)
    data = mutate(rng.choice(tar_seeds()), rng)
    if rng.random() < 0.8:
        data = fix_tar_checksums(data)
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    try:
        members = list(scan_members(fd))
    except TarFormatError:
        return  # refusing damage is always allowed (tarfile often stops early silently instead)
    except Exception as err:
        raise AssertionError(f"seed {seed}: {type(err).__name__}: {err}") from err
    for member in members:
        assert 512 <= member.offset and member.offset + member.size <= len(data), (
            f"seed {seed}: {member}"
        )
    expected = _tarfile_view(data)
    if expected is not None:
        assert [(m.name, m.offset, m.size) for m in members if not m.sparse] == expected, (
            f"seed {seed}"
        )


def fuzz_tars(budget_s: float, first_seed: int = 0) -> int:
    fd = os.memfd_create("tar-fuzz") if hasattr(os, "memfd_create") else None
    if fd is None:
        import tempfile

        handle = tempfile.TemporaryFile()
        fd = os.dup(handle.fileno())
        handle.close()
    try:
        return run_cases(
            itertools.count(first_seed), budget_s, lambda seed: check_tar_case(seed, fd)
        )
    finally:
        os.close(fd)


@pytest.mark.slow  # the quick tier covers the scanner in test_tar_scan
def test_fuzz_tar_scanner_against_tarfile():
    assert fuzz_tars(TAR_BUDGET_S) > 50

"""Shared fixtures: tiny ImageNet-format archives and shards, generated per test session."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep.build import BuildConfig, build
from prep.sample import write_sample


def jpeg_bytes(
    height: int, width: int, seed: int = 0, mode: str = "RGB", quality: int = 90
) -> bytes:
    """A smooth-but-not-flat test image (gradients + a little noise), encoded."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), ((xx + yy) * 3) % 256],
        axis=-1,
    ).astype(np.int16)
    pixels = np.clip(pixels + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(
        out,
        "PNG" if mode in ("RGBA", "P", "LA") else "JPEG",
        **({} if mode in ("RGBA", "P", "LA") else {"quality": quality}),
    )
    return out.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_train_tar(path: Path, classes: dict[str, list[tuple[str, bytes]]]) -> Path:
    """ImageNet's train layout by hand: a tar of `<wnid>.tar`, each with flat members."""
    with tarfile.open(path, "w") as outer:
        for wnid, members in classes.items():
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for name, data in members:
                    add_member(inner, name, data)
            add_member(outer, f"{wnid}.tar", inner_bytes.getvalue())
    return path


def wait_for_progress(partial: Path, process: subprocess.Popen, at_least: int) -> None:
    """Wait until the build in `process` has committed `at_least` records to `partial`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads((partial / "progress.json").read_text())["num_records"] >= at_least:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"build finished or stalled before {at_least} records were committed")


@pytest.fixture(scope="session")
def sample_src(tmp_path_factory) -> tuple[Path, object]:
    """3 classes x 6 train + 4 val images in the exact ILSVRC2012 archive format."""
    src = tmp_path_factory.mktemp("sample")
    info = write_sample(src, num_classes=3, train_per_class=6, val_per_class=4, seed=0)
    return src, info


@pytest.fixture(scope="session")
def built_shards(sample_src, tmp_path_factory) -> Path:
    """train-160/val-160 in LMDB and msgpack, built once per session: out/<store>/<split>-160."""
    src, _ = sample_src
    out = tmp_path_factory.mktemp("shards")
    for store in ("lmdb", "msgpack"):
        for split in ("train", "val"):
            build(BuildConfig(src, out / store, split, (160,), store, workers=0, quiet=True))
    return out


@pytest.fixture
def read_only_dir(monkeypatch):
    """`read_only_dir(path)`: every open for writing under `path` fails as on a read-only
    mount (the suite runs as root, which no permission bit stops)."""

    def make_read_only(path: Path) -> Path:
        real_open = os.open

        def read_only_open(name, flags, *args, **kwargs):
            if str(name).startswith(str(path)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, "Read-only file system", str(name))
            return real_open(name, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)
        return path

    return make_read_only


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Runs that pass threads=1 (2-core machines run much faster unoversubscribed) set torch's
    process-wide thread count; put it back for the next test."""
    import sys

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    if threads is not None:
        torch.set_num_threads(threads)

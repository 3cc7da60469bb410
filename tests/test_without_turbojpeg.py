"""The PIL fallback, as a machine without libturbojpeg runs it (SHARDTRAIN_NO_TURBOJPEG=1 hides
the library in this process and every process it starts). The whole suite runs that way too:
`SHARDTRAIN_NO_TURBOJPEG=1 make test`."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import numpy as np

from formats import jpeg
from formats.record import RECORD_DTYPE
from tests.test_bad_images import with_jpeg_dims

HIDDEN = {**os.environ, jpeg.HIDE_TURBOJPEG_ENV: "1"}


def _prep(*args, env=HIDDEN):
    return subprocess.run([sys.executable, "-m", "prep.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_hiding_turbojpeg_switches_every_codec_path(monkeypatch):
    monkeypatch.setenv(jpeg.HIDE_TURBOJPEG_ENV, "1")
    jpeg.turbo.cache_clear()
    try:
        assert jpeg.turbo() is None and "hidden by SHARDTRAIN_NO_TURBOJPEG" in jpeg.codec_report()["turbojpeg"]
    finally:
        monkeypatch.delenv(jpeg.HIDE_TURBOJPEG_ENV)
        jpeg.turbo.cache_clear()


def test_verify_without_turbojpeg_decodes_at_full_size(built_shards):
    """It used to decode at 1/8 scale and report every record as a size mismatch."""
    for store in ("lmdb", "msgpack"):
        result = _prep("verify", str(built_shards / store / "train-160"), "--workers", "1", "-q")
        assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr


def test_build_without_turbojpeg_makes_a_dataset_that_verifies_both_ways(sample_src, tmp_path):
    src, _ = sample_src
    built = _prep("build-msgpack", "--src", str(src), "--out", str(tmp_path), "--split", "val", "--size", "96",
                  "--workers", "1", "-q")
    assert built.returncode == 0 and "PIL fallback" in built.stdout, built.stderr
    for env in (HIDDEN, os.environ):
        result = _prep("verify", str(tmp_path / "val-96"), "--workers", "1", "-q", env=env)
        assert result.returncode == 0, result.stdout


def test_verify_refuses_a_tampered_header_before_decoding(built_shards, tmp_path):
    """A record whose header claims 40000x40000 (crc and table made to agree with it) is a fault,
    not a 4.8 GB allocation."""
    from formats.msgpack_store import INDEX_FILE, shard_file_name
    from formats.record import checksum

    copy = tmp_path / "val-160"
    shutil.copytree(built_shards / "msgpack" / "val-160", copy)
    row = np.load(copy / INDEX_FILE)[0]
    start = int(row["offset"] + row["record_length"] - row["jpeg_length"])
    shard = copy / shard_file_name(int(row["shard"]))
    data = bytearray(shard.read_bytes())
    forged = with_jpeg_dims(bytes(data[start:start + int(row["jpeg_length"])]), 40000, 40000)
    data[start:start + len(forged)] = forged  # same length: only the SOF size changed
    shard.write_bytes(bytes(data))
    records = np.load(copy / "records.npy")
    records["crc32"][0] = checksum(forged)
    np.save(copy / "records.npy", records.astype(RECORD_DTYPE))
    result = _prep("verify", str(copy), "--workers", "1", "-q", env=os.environ)
    assert result.returncode == 1 and "record 0" in result.stdout, result.stdout + result.stderr
    assert "header says 40000x40000" in result.stdout or "decompression bomb" in result.stdout  # (PIL)


def test_pass_through_keeps_the_same_jpegs_without_turbojpeg(monkeypatch):
    """Which JPEGs are stored byte for byte must not depend on libturbojpeg being installed."""
    from PIL import Image

    from prep.resize import prepare_image
    from tests.conftest import jpeg_bytes

    gray = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(160, 213, seed=2))).convert("L").save(gray, "JPEG")
    inputs = [jpeg_bytes(160, 213, seed=1), jpeg_bytes(100, 140, seed=3), gray.getvalue()]
    with_turbo = [prepare_image(data, (160,), 90).outputs[0] for data in inputs]
    monkeypatch.setenv(jpeg.HIDE_TURBOJPEG_ENV, "1")
    jpeg.turbo.cache_clear()
    try:
        without = [prepare_image(data, (160,), 90).outputs[0] for data in inputs]
    finally:
        monkeypatch.delenv(jpeg.HIDE_TURBOJPEG_ENV)
        jpeg.turbo.cache_clear()
    assert [o.stored_as_is for o in without] == [o.stored_as_is for o in with_turbo] == [True, True, False]
    assert without[0].jpeg == inputs[0] and without[1].jpeg == inputs[1]

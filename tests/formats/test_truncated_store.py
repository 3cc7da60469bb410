"""A truncated data.mdb is one clear line from `prep verify` and from the readers train uses,
never a SIGBUS (mapping it and touching a page past the end of the file kills the process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from formats import DatasetError
from formats.dataset import RecordDataset
from formats.lmdb_store import check_data_file

READ_ALL = """
import sys
from formats.dataset import RecordDataset
from formats import DatasetError
try:
    dataset = RecordDataset(sys.argv[1])
    print(sum(len(dataset.view(i)) for i in range(len(dataset))))
except DatasetError as err:
    print(f"DatasetError: {err}", file=sys.stderr)
    sys.exit(1)
"""


def _truncated_copy(built_shards, tmp_path, keep) -> "os.PathLike":
    copy = tmp_path / "train-160"
    shutil.copytree(built_shards / "lmdb" / "train-160", copy)
    data = copy / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, keep(size))
    return copy


@pytest.mark.parametrize(
    "keep", [lambda n: n - 4096, lambda n: n // 2, lambda n: 8192 + 100, lambda n: 100]
)
def test_verify_and_readers_say_truncated_in_one_line(built_shards, tmp_path, keep):
    dataset = _truncated_copy(built_shards, tmp_path, keep)
    verify = subprocess.run(
        [sys.executable, "-m", "prep.cli", "verify", str(dataset), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 1, (verify.returncode, verify.stderr)  # SIGBUS would be -7
    assert (
        "Traceback" not in verify.stderr
        and "data.mdb" in verify.stdout
        and "FAULT" in verify.stdout
    )
    assert "truncated" in verify.stdout
    read = subprocess.run(
        [sys.executable, "-c", READ_ALL, str(dataset)], capture_output=True, text=True, timeout=120
    )
    assert read.returncode == 1, (read.returncode, read.stderr)
    assert read.stderr.startswith("DatasetError: ") and "truncated" in read.stderr
    assert len(read.stderr.strip().splitlines()) == 1
    with pytest.raises(DatasetError, match="truncated"):
        RecordDataset(dataset)


def test_an_intact_data_file_passes_and_garbage_is_refused(built_shards, tmp_path):
    check_data_file(built_shards / "lmdb" / "train-160")
    (tmp_path / "data.mdb").write_bytes(b"\x00" * 20000)
    with pytest.raises(DatasetError, match="not an LMDB data file"):
        check_data_file(tmp_path)


def test_resume_over_a_truncated_partial_store_says_overwrite(sample_src, tmp_path, monkeypatch):
    import errno

    from formats.lmdb_store import LmdbWriter
    from prep.build import BuildConfig, build
    from prep.partial import BuildError

    src, _ = sample_src
    original, calls = LmdbWriter.append, {"n": 0}

    def append_until_full(self, index, label, jpeg):
        calls["n"] += 1
        if calls["n"] > 17:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, index, label, jpeg)

    monkeypatch.setattr(LmdbWriter, "append", append_until_full)
    config = BuildConfig(
        src, tmp_path, "train", (64,), "lmdb", workers=0, quiet=True, commit_every=2
    )
    with pytest.raises(BuildError, match="No space left"):
        build(config)
    monkeypatch.setattr(LmdbWriter, "append", original)
    data = tmp_path / ".train-64.partial" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(DatasetError, match="truncated.*pass --overwrite"):
        build(config)
    from dataclasses import replace

    assert build(replace(config, overwrite=True)).manifests[64].count == 18

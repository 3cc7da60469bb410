"""One line for what a user can fix: a full disk under either store names the file and says
"No space left on device" (LMDB said "mdb_txn_commit: Input/output error", msgpack gave no
file), and the build resumes once there is space; a devkit whose gzip stream is corrupt is one
line (tarfile's "r:*" listed four methods' failures)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.sample import write_sample
from prep.verify import verify

REPO = Path(__file__).resolve().parents[2]


def _can_mount_private_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {tmp_path}"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("write_errors_src")
    write_sample(src, num_classes=3, train_per_class=40, val_per_class=2, seed=4)
    return src


@pytest.mark.parametrize(
    "store, store_file", [("lmdb", "data.mdb"), ("msgpack", "shard-00000.msgpack")]
)
def test_a_full_disk_is_one_line_naming_the_file_and_the_build_resumes(
    src, tmp_path, store, store_file
):
    """A small tmpfs in a private mount namespace (no root needed, nothing left mounted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_private_tmpfs(disk):
        pytest.skip("no private tmpfs mounts here (unshare -rm)")
    build = (
        f"{sys.executable} -m prep.cli build-{store} --src {src} --out {disk}/out --size 64 "
        "--workers 0 -q --commit-every 10"
    )
    script = (
        f"mount -t tmpfs -o size=256k none {disk} && {{ {build} 2> {tmp_path}/first.err; "
        f"echo $? > {tmp_path}/first.rc; mount -o remount,size=16m {disk} && {build} && "
        f"cp -r {disk}/out {tmp_path}/kept; }}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "first.rc").read_text().strip() == "1"
    lines = (tmp_path / "first.err").read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"prep: error: {disk}/out/.train-64.partial/{store_file}: No space left on device; "
        "the unfinished build"
    ), lines[0]
    assert "resume" in lines[0]
    assert "resumed" in result.stdout  # the second run carried on from the first one's commits
    assert verify(tmp_path / "kept" / "train-64", workers=1, quiet=True).ok


def test_a_devkit_with_a_corrupt_gzip_stream_is_one_line(src, tmp_path):
    devkit = src / "ILSVRC2012_devkit_t12.tar.gz"
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    raw = bytearray(devkit.read_bytes())
    assert raw[:2] == b"\x1f\x8b" and raw[3] == 0  # no optional header fields: deflate starts at 10
    raw[10] |= 0b110  # block type 11: reserved, "invalid block type"
    (copy / devkit.name).write_bytes(bytes(raw))
    result = CliRunner().invoke(
        app,
        [
            "build-lmdb",
            "--src",
            str(copy),
            "--out",
            str(tmp_path / "out"),
            "--split",
            "val",
            "--size",
            "32",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"prep: error: {copy / devkit.name}: unreadable devkit "
        "(zlib error: Error -3 while decompressing data: invalid block type)"
    ]

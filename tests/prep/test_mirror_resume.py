"""Streamed mirrors (parquet row groups, tar.gz streams) under kill -9 and torchrun: a build
killed twice resumes to the output of an uninterrupted one, byte for byte, and two torchrun
ranks build parts that rank 0 merges into the single build's dataset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from formats.manifest import read_manifest
from tests.conftest import jpeg_bytes, wait_for_progress
from tests.prep import layouts
from tests.prep.test_build import dataset_bytes

REPO = Path(__file__).resolve().parents[2]
PREP = [sys.executable, "-m", "prep.cli"]


def many_images(count: int = 90):
    wnids = layouts.imagenet_wnids()
    return [
        (wnids[i % 5 * 200], f"{wnids[i % 5 * 200]}_{i}", jpeg_bytes(150 + i % 7, 170, seed=i))
        for i in range(count)
    ]


# hf-targz slow: the quick tier starts tar.gz reading mid-stream in test_mirrors' parts tests
@pytest.mark.parametrize("layout", ["hf-parquet", pytest.param("hf-targz", marks=pytest.mark.slow)])
def test_kill_9_and_resume_gives_identical_output(tmp_path, layout):
    src = tmp_path / "src"
    if layout == "hf-parquet":
        layouts.write_hf_parquet(src, many_images(), num_files=3, row_group_rows=7)
    else:
        layouts.write_hf_targz(src, many_images(), num_files=3)
    command = PREP + [
        "build-msgpack",
        "--src",
        str(src),
        "--size",
        "128",
        "--workers",
        "1",
        "--commit-every",
        "4",
        "--shard-mb",
        "1",
        "-q",
    ]
    subprocess.run(
        command + ["--out", str(tmp_path / "whole")], check=True, capture_output=True, cwd=REPO
    )
    killed = tmp_path / "killed"
    for at_least in (8, 50):  # kill twice, at different points
        process = subprocess.Popen(
            command + ["--out", str(killed)],
            start_new_session=True,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_progress(killed / ".train-128.partial", process, at_least)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    resumed = subprocess.run(
        command + ["--out", str(killed)], check=True, capture_output=True, text=True, cwd=REPO
    )
    assert "resumed after" in resumed.stdout and f"source: {layout} layout" in resumed.stdout
    whole, again = tmp_path / "whole" / "train-128", killed / "train-128"
    for name in ["manifest.json", *read_manifest(whole).files]:
        assert (whole / name).read_bytes() == (again / name).read_bytes(), name
    assert dataset_bytes(whole) == dataset_bytes(again)


@pytest.mark.slow  # quick tier: parquet parts + merge in test_mirrors.py; torchrun: test_parts.py
def test_torchrun_two_ranks_on_parquet_equal_a_single_build(tmp_path):
    src = tmp_path / "src"
    layouts.write_hf_parquet(src, many_images(30), num_files=2, row_group_rows=4)
    base = ["build-lmdb", "--src", str(src), "--size", "64", "--workers", "1", "-q"]
    subprocess.run(
        PREP + base + ["--out", str(tmp_path / "single")], check=True, capture_output=True, cwd=REPO
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "prep.cli",
        *base,
        "--out",
        str(tmp_path / "ddp"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "merged from 2 parts" in result.stdout
    single, merged = tmp_path / "single" / "train-64", tmp_path / "ddp" / "train-64"
    assert (single / "manifest.json").read_bytes() == (merged / "manifest.json").read_bytes()
    assert (single / "records.npy").read_bytes() == (merged / "records.npy").read_bytes()
    assert dataset_bytes(single) == dataset_bytes(merged)

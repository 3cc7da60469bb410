"""Concurrent and interrupted builds: one writer per output (a second build refuses, naming the
holder), workers never outlive the main process, SIGTERM is one line and resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from formats.manifest import read_manifest
from prep.build import BuildConfig, build
from prep.lock import LockedError, lock_path, locked
from prep.sample import write_sample
from prep.verify import verify
from tests.conftest import wait_for_progress

PREP = [sys.executable, "-m", "prep.cli"]


@pytest.fixture(scope="module")
def slow_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("slow-src")
    write_sample(src, num_classes=3, train_per_class=60, val_per_class=1, seed=4)
    return src


def _command(src, out, workers=2):
    return PREP + [
        "build-msgpack",
        "--src",
        str(src),
        "--out",
        str(out),
        "--size",
        "160",
        "--size",
        "96",
        "--workers",
        str(workers),
        "--commit-every",
        "4",
        "-q",
    ]


def _start(command):
    return subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _children(process) -> list[psutil.Process]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(process.pid).children(recursive=True)
        if children:
            return children
        time.sleep(0.01)
    raise AssertionError("no worker processes")


def _assert_gone_within(processes, seconds):
    gone, alive = psutil.wait_procs(processes, timeout=seconds)
    for orphan in alive:  # never leave orphans behind, even when the test fails
        orphan.kill()
    assert not alive, f"{len(alive)} workers outlived the main process"


HOLD_LOCK = """
import sys, time
from pathlib import Path
from prep.lock import acquire
acquire(Path(sys.argv[1]), "test")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_build_of_the_same_output_refuses_naming_the_holder(slow_src, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock_path(tmp_path, "train-96"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        refused = subprocess.run(
            _command(slow_src, tmp_path), capture_output=True, text=True, timeout=60
        )
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1, refused.stderr
        assert (
            lines[0].startswith("prep: error: ")
            and f"train-96 is being built by PID {holder.pid}" in lines[0]
        )
        assert not (tmp_path / ".train-160.partial").exists()  # refused before touching anything
    finally:
        holder.kill()  # SIGKILL: the kernel releases its lock
        holder.wait()
    built = subprocess.run(
        _command(slow_src, tmp_path), capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr
    for size in (160, 96):
        assert verify(tmp_path / f"train-{size}", workers=1, quiet=True).ok
    assert not list(tmp_path.glob(".*"))  # lock files removed with the partial directories


def test_kill_9_releases_the_lock_and_kills_the_workers(slow_src, tmp_path):
    command = _command(slow_src, tmp_path)
    first = _start(command)
    wait_for_progress(tmp_path / ".train-96.partial", first, 8)  # 96 commits after 160
    workers = _children(first)
    first.kill()  # the main process only: its workers must not live on
    first.wait()
    _assert_gone_within(workers, 5)
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "resumed after" in resumed.stdout, resumed.stderr
    assert verify(tmp_path / "train-160", workers=1, quiet=True).ok


@pytest.mark.parametrize("whole_group", [False, True])
def test_sigterm_is_one_line_exit_143_and_resumable(slow_src, tmp_path, whole_group):
    command = _command(slow_src, tmp_path)
    process = _start(command)
    wait_for_progress(tmp_path / ".train-96.partial", process, 8)  # 96 commits after 160
    workers = _children(process)
    if whole_group:  # as a service manager stops a job
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.terminate()
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        _assert_gone_within(workers, 5)
    assert process.returncode == 143
    assert stderr.strip().splitlines() == [
        "prep: error: terminated (SIGTERM); rerun the same command to resume"
    ]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "resumed after" in resumed.stdout, resumed.stderr
    assert read_manifest(tmp_path / "train-96").count == 180


def test_a_held_lock_refuses_in_process(sample_src, tmp_path):
    src, _ = sample_src
    with locked([(lock_path(tmp_path, "val-64"), "val-64")]):
        with pytest.raises(LockedError, match=f"PID {os.getpid()}"):
            build(BuildConfig(src, tmp_path, "val", (64,), "lmdb", workers=0, quiet=True))
    assert (
        build(BuildConfig(src, tmp_path, "val", (64,), "lmdb", workers=0, quiet=True))
        .manifests[64]
        .count
        == 12
    )


def test_two_builds_started_together_never_corrupt_the_output(slow_src, tmp_path):
    """Whichever gets the lock builds; the other refuses, or finds the dataset finished."""
    command = _command(slow_src, tmp_path, workers=1)
    first, second = _start(command), _start(command)
    results = [p.communicate(timeout=120) + (p.returncode,) for p in (first, second)]
    assert sorted(code for _, _, code in results) in ([0, 0], [0, 1])
    for stdout, stderr, code in results:
        assert code == 0 or (
            len(stderr.strip().splitlines()) == 1 and "is being built by PID" in stderr
        )
    for size in (160, 96):
        report = verify(tmp_path / f"train-{size}", workers=1, quiet=True)
        assert report.ok and report.records_checked == 180

"""No prep rank waits forever: a rank whose launcher (torchrun's agent) is killed exits within
seconds with one line, whether its main thread can unwind or is stuck in C; WORLD_SIZE/RANK/
MASTER_* left over in a shell give up after the rendezvous timeout with one line naming them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prep.sample import write_sample

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def loading_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(map(alive, pids)):
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]


# An "agent" that starts one rank running the watch, then waits for it. The rank's main thread
# either unwinds on SIGTERM (as prep's CLI does) or is stuck where no Python handler runs.
AGENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(child.pid, flush=True)
child.wait()
"""
RANK = """
import signal, sys, time
from prep.rank_watch import ParentWatch
watch = ParentWatch("prep: error: the agent is gone", grace_seconds=2.0).start()
if {stuck}:
    signal.signal(signal.SIGTERM, lambda *a: None)  # a main thread in C never runs the handler
else:
    def unwind(*a):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, unwind)
print("ready", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    sys.stderr.write("prep: error: unwound, lost=%s\\n" % watch.lost.is_set())
    sys.exit(1)
"""


@pytest.mark.parametrize("stuck", [False, True])
def test_a_rank_exits_within_seconds_when_its_agent_is_killed(stuck):
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, RANK.format(stuck=stuck)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rank = int(agent.stdout.readline())
    try:
        assert agent.stdout.readline().strip() == "ready"  # the rank shares the agent's pipes
        agent.kill()
        started = time.monotonic()
        assert wait_gone([rank], 15) == [], "the rank outlived its agent"
        took = time.monotonic() - started
        _, stderr = agent.communicate(timeout=10)
        expected = "prep: error: the agent is gone" if stuck else "prep: error: unwound, lost=True"
        assert stderr.strip().splitlines() == [expected]
        # poll 0.5 s (+ grace 2 s when stuck), on a loaded machine
        assert took < (6 if stuck else 4), took
    finally:
        if alive(rank):
            os.kill(rank, signal.SIGKILL)


# slow: the quick tier covers the same failed-join path (test_parts' WORLD_SIZE without torchrun)
@pytest.mark.slow
def test_leftover_torchrun_variables_give_up_with_one_line_naming_them(tmp_path):
    src = tmp_path / "src"
    write_sample(src, num_classes=2, train_per_class=2, val_per_class=1, seed=1)
    port = str(free_port())
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "PREP_RENDEZVOUS_SECONDS": "1",
    }
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prep.cli",
            "build-msgpack",
            "--src",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "32",
            "--workers",
            "0",
            "-q",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT={port} are set" in lines[0]
    assert "within 1 s" in lines[0] and "PREP_RENDEZVOUS_SECONDS" in lines[0]
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("train-32*"))


def test_a_bad_rendezvous_timeout_is_one_line(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "PREP_RENDEZVOUS_SECONDS": "soon"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prep.cli",
            "build-msgpack",
            "--src",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "32",
            "--workers",
            "0",
            "-q",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "prep: error: PREP_RENDEZVOUS_SECONDS='soon': need a number of seconds > 0"
    ]


@pytest.mark.slow
def test_torchrun_ranks_exit_when_the_agent_dies_before_they_join_and_the_part_resumes(tmp_path):
    """The issue's case: torchrun killed (-9) right after it started both ranks."""
    src = tmp_path / "src"
    write_sample(src, num_classes=3, train_per_class=6, val_per_class=1, seed=2)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "prep.cli",
        "build-lmdb",
        "--src",
        str(src),
        "--out",
        str(tmp_path / "ddp"),
        "--size",
        "48",
        "--workers",
        "0",
        "-q",
    ]
    agent = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(ranks) < 2 and time.monotonic() < deadline:
            ranks = children(agent.pid)
            time.sleep(0.05)
        assert len(ranks) == 2, "torchrun did not start 2 ranks"
        while not all(map(loading_torch, ranks)) and time.monotonic() < deadline:
            time.sleep(0.05)  # each rank's watch starts before it imports torch for the rendezvous
        agent.kill()
        assert wait_gone(ranks, 20) == [], "ranks outlived their agent"
        _, stderr = agent.communicate(timeout=10)
        lines = [line for line in stderr.splitlines() if line.startswith("prep: error:")]
        assert len(lines) == 2 and all("torchrun's agent) is gone" in line for line in lines), (
            stderr
        )
        assert "Traceback" not in stderr
    finally:
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if not p.name.startswith(".")) == [
        "train-48"
    ]


@pytest.mark.slow
def test_torchrun_ranks_exit_when_the_agent_dies_mid_build_and_at_the_barrier(tmp_path):
    """Part 1 is built beforehand, so rank 1 waits in gloo's barrier (where no Python signal
    handler runs) while rank 0 builds part 0; the agent is killed then: both exit in seconds."""
    src = tmp_path / "src"
    write_sample(src, num_classes=4, train_per_class=250, val_per_class=1, seed=3)
    out = tmp_path / "ddp"
    common = [
        "--src",
        str(src),
        "--out",
        str(out),
        "--size",
        "64",
        "--workers",
        "0",
        "-q",
        "--commit-every",
        "10",
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "prep.cli",
            "build-msgpack",
            *common,
            "--num-parts",
            "2",
            "--part-index",
            "1",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "prep.cli",
            "build-msgpack",
            *common,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    progress = out / ".train-64.part-0-of-2.partial" / "progress.json"
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (
            progress.is_file() and '"num_records": 0' not in progress.read_text()
        ):
            ranks = children(agent.pid) or ranks
            time.sleep(0.05)
        assert len(ranks) == 2 and progress.is_file(), "rank 0 never got to building its part"
        agent.kill()
        started = time.monotonic()
        assert wait_gone(ranks, 20) == [], "ranks outlived their agent"
        took = time.monotonic() - started
        _, stderr = agent.communicate(timeout=10)
        lines = [line for line in stderr.splitlines() if line.startswith("prep: error:")]
        assert sorted(line.split(":")[2].strip() for line in lines) == ["rank 0", "rank 1"], stderr
        assert (
            all("torchrun's agent) is gone" in line for line in lines) and "Traceback" not in stderr
        )
        assert took < 10, took  # poll 0.5 s, then rank 1's 5 s grace in the barrier
    finally:
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert (out / "train-64.part-1-of-2" / "manifest.json").is_file()  # the finished part is kept
    assert progress.is_file()  # and rank 0's resumes from its last commit

"""Launcher variables left over in a shell (no torchrun): one line within the rendezvous bound."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
JOIN = "from train.engine.dist import init_distributed; init_distributed('cpu')"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join(**variables: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", f"{JOIN}\nprint('joined')"],
        cwd=REPO,
        env={**os.environ, "TRAIN_RENDEZVOUS_SECONDS": "2", **variables},
        capture_output=True,
        text=True,
        timeout=60,  # the old code waited the collectives' 30 min
    )
    return done, time.monotonic() - started


def test_leftover_launcher_variables_fail_within_the_rendezvous_timeout() -> None:
    port = str(free_port())
    done, seconds = join(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    assert done.returncode != 0 and "joined" not in done.stdout
    line = done.stderr.strip().splitlines()[-1]
    assert f"WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT={port} are set" in line
    assert "within 2 s" in line and "TRAIN_RENDEZVOUS_SECONDS" in line
    assert seconds < 40


def test_a_bad_rendezvous_timeout_is_one_line() -> None:
    done, _ = join(WORLD_SIZE="2", RANK="1", TRAIN_RENDEZVOUS_SECONDS="soon")
    assert "TRAIN_RENDEZVOUS_SECONDS='soon': need a number of seconds > 0" in done.stderr

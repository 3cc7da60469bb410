"""Issue-10 bench machinery without the peers' venv: the decode-only floors, the window protocol,
and the one-line skip of FFCV/DALI rows when their venv is missing. Tiny data, seconds."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import jpeg_bytes
from tests.loader_shards import dataset_dir
from train.data.decode import native_module

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # as the bench scripts do for their siblings

decode_floor = importlib.import_module("decode_floor")
window_server = importlib.import_module("window_server")
peer_servers = importlib.import_module("peer_servers")

needs_native = pytest.mark.skipif(
    native_module() is None, reason="train.data.decode_native is not built"
)


@needs_native
@pytest.mark.parametrize("kind", decode_floor.KINDS)
def test_decode_floor_decodes_every_record_at_the_loaders_scale(built_shards, kind):
    if kind not in decode_floor.kinds_available():
        with pytest.raises(ValueError, match="kind must be one of"):
            decode_floor.time_floor(decode_floor.floor_jobs(dataset_dir(built_shards), 32), 1, kind)
        return
    jobs = decode_floor.floor_jobs(dataset_dir(built_shards), 32)
    assert sum(decode_floor.scale_shares(jobs).values()) == pytest.approx(1.0)
    assert "1/1" in decode_floor.scale_shares(jobs) and len(decode_floor.scale_shares(jobs)) > 1
    for threads in (1, 2):
        result = decode_floor.time_floor(jobs, 2 * len(jobs), kind, threads)
        assert (
            result["images"] == 2 * len(jobs)
            and result["seconds"] > 0
            and result["workers"] == threads
        )


@needs_native
def test_decode_only_reports_a_corrupt_record(built_shards):
    """The floor must not time a failed decode as a fast one."""
    from train.data.decode import decode_only

    data = jpeg_bytes(64, 64, seed=2)
    for region in (True, False):
        failure = decode_only(
            [data, data[: len(data) // 2]],
            np.array([64, 64]),
            np.array([64, 64]),
            np.array([[0, 0, 64, 64]] * 2),
            32,
            32,
            region,
        )
        assert failure is not None and failure[0] == 1


def test_window_protocol_times_the_requested_batches(monkeypatch, capsys):
    import io

    import torch

    def batches():
        while True:
            yield torch.zeros((4, 3, 2, 2), dtype=torch.uint8), torch.zeros(4)

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"batches": 5, "warmup": 2}\n{"quit": true}\n'))
    assert window_server.serve(batches, {"library": "fake"}, 1) == 0
    ready, result = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ready["ready"]["shape"] == [4, 3, 2, 2] and ready["ready"]["contiguous"]
    assert result["batches"] == 5 and result["images"] == 20 and result["seconds"] > 0


def test_window_protocol_reports_a_broken_loader_as_one_line(monkeypatch, capsys):
    def batches():
        raise OSError("no such beton")
        yield

    assert window_server.serve(batches, {}, 1) == 1
    assert json.loads(capsys.readouterr().out) == {"error": "OSError: no such beton"}


def test_peer_rows_are_skipped_with_one_line_without_their_venv(tmp_path):
    class Args:
        peers_python = tmp_path / "nowhere" / "bin" / "python"
        workers, batch_size, repeats, seconds = 2, 8, 1, 0.1

    rows = peer_servers.peer_baselines(Args(), tmp_path, tmp_path)
    assert {(group, key) for group, key, _, _ in rows} == {
        (g, k) for g in ("train128", "train224") for k in ("ffcv", "ffcv-contiguous", "dali")
    }
    for _, _, _, thunk in rows:
        message = thunk()
        assert message.startswith("skipped: no peer venv") and "setup_peers.sh" in message


def test_peer_runner_is_self_contained():
    """peers_runner.py runs under a venv without our packages: it must not import them."""
    source = (BENCH / "peers_runner.py").read_text() + (BENCH / "window_server.py").read_text()
    for ours in ("formats", "train", "prep", "decode_floor", "loader_baselines"):
        assert f"import {ours}" not in source and f"from {ours}" not in source
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers_runner.py"), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "write-ffcv" in done.stdout

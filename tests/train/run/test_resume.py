"""Exact resume: a run SIGKILLed mid-epoch and resumed ends bit-identical to an uninterrupted one.

The runs go through `tests/train/standin.py` (train.run.main.run on in-memory stand-in data) so
the killed process is a real one; single-threaded torch on CPU with deterministic algorithms.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train import standin as train_standin
from train.run.metrics import read_metrics

REPO = Path(__file__).resolve().parents[3]
STANDIN = REPO / "tests" / "train" / "standin.py"
PHASES = [
    {"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": [0.05, 0.2]},
    {"epochs": [1, 2], "prep_size": 160, "crop_size": 40, "batch_size": 8, "lr": [0.2, 0.0]},
]
RECIPE = {"arch": "resnet18", "label_smoothing": 0.1, "ema_decay": 0.9, "mixup_alpha": 0.2}
COMMON = ["--threads", "1", "--num-train", "64"]  # 8 steps an epoch


def standin(*args) -> list[str]:
    return [sys.executable, str(STANDIN), *map(str, args), *COMMON]


def load(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)


# Wall-clock sums: the only checkpoint values allowed to differ between the two runs.
TIMING_KEYS = {"elapsed_s", "eval_s", "train_s", "data_wait_s"}


def assert_bit_identical(a, b, where: str = "") -> None:
    """Tensors bit for bit, and every other leaf (lr, momentum, step counters, RNG states,
    the scaler's state, the schedule) equal and of the same type; anything else fails."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            if key not in TIMING_KEYS:
                assert_bit_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    elif a is None or isinstance(a, (bool, int, float, str)):
        assert a == b, f"{where}: {a!r} != {b!r}"
    else:
        raise AssertionError(f"{where}: cannot compare a {type(a).__name__}")


def test_assert_bit_identical_sees_non_tensor_state() -> None:
    state = {
        "epoch": 2,
        "optimizer": {"param_groups": [{"lr": 0.1, "momentum": 0.9}]},
        "rng": {"python": (3, (1, 2), None), "torch": torch.arange(4)},
        "scaler": None,
        "elapsed_s": 1.0,
    }
    assert_bit_identical(state, {**state, "elapsed_s": 2.0})  # timing may differ
    for changed in (
        {"epoch": 3},
        {"optimizer": {"param_groups": [{"lr": 0.2, "momentum": 0.9}]}},
        {"rng": {"python": (3, (1, 3), None), "torch": torch.arange(4)}},
        {"scaler": {"scale": 65536.0}},
        {"epoch": 2.0},
    ):
        with pytest.raises(AssertionError):
            assert_bit_identical(state, {**state, **changed})


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps({"recipe": RECIPE, "phases": PHASES}))

    threads = torch.get_num_threads()
    try:  # the uninterrupted reference, in this process, with the same settings
        train_standin.main(["--phases", str(phases), "--out", str(tmp_path / "ref"), *COMMON])
    finally:
        torch.set_num_threads(threads)

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.pt"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    process = subprocess.Popen(
        standin(
            "--phases", phases, "--out", killed, "--delay", "0.3", "--checkpoint-every-steps", "3"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not last.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.5)  # a step or two past the checkpoint: the resume must redo them
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    stopped_at = torch.load(last, weights_only=True)
    assert stopped_at["step"] > 0 and not (killed / "checkpoints" / "final.pt").exists()

    resumed = subprocess.run(
        standin("--phases", phases, "--out", killed, "--resume", "auto"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr

    reference, result = load(tmp_path / "ref"), load(killed)
    assert_bit_identical(reference, result)  # weights, optimizer, EMA, RNG, counters, all
    assert (result["epoch"], result["step"], result["global_step"]) == (2, 0, 16)
    ref_records, records = read_metrics(tmp_path / "ref"), read_metrics(killed)
    assert [r["epoch"] for r in records] == [0, 1]  # the redone epoch is not listed twice
    for ref, got in zip(ref_records, records):
        for key in ("top1", "top5", "train_loss", "lr", "ema_top1"):
            assert ref[key] == got[key], key
    assert "Resumed from" in (killed / "event.log").read_text()

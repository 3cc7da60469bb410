"""The trainer on real shards (prep-built, tiny) through the `train` CLI: run, report, export,
and SIGTERM -> checkpoint -> `--resume auto`. Plain imports: a broken module fails this test
(an ImportError is a failure, never a skip)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from train.cli import app
from train.run.metrics import read_metrics

REPO = Path(__file__).resolve().parents[3]
PHASES = [  # conftest's shards: 3 classes x 6 train / 4 val images at prep_size 160
    {"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 4, "lr": [0.05, 0.1]},
    {
        "epochs": [1, 3],
        "prep_size": 160,
        "crop_size": 48,
        "batch_size": 4,
        "lr": [0.1, 0.0],
        "min_scale": 0.35,
    },
]


def write_phases(tmp_path: Path) -> Path:
    path = tmp_path / "phases.json"
    path.write_text(
        json.dumps({"recipe": {"arch": "resnet18", "label_smoothing": 0.1}, "phases": PHASES})
    )
    return path


def train_args(tmp_path: Path, shards: Path, out: Path) -> list[str]:
    return [
        "run",
        "--phases",
        str(write_phases(tmp_path)),
        "--data",
        str(shards),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
        "--no-tensorboard",
        "--log-every",
        "1",
    ]


@pytest.mark.parametrize("store", ["lmdb", pytest.param("msgpack", marks=pytest.mark.slow)])
def test_run_report_export_through_the_cli(built_shards, tmp_path: Path, store: str) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, train_args(tmp_path, built_shards / store, out))
    assert result.exit_code == 0, result.stderr
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2]
    assert "done: top-1" in result.stderr and "top5 >= 93%" in result.stderr
    report = runner.invoke(app, ["report", str(out), "--target", "top1=10"])
    assert report.exit_code == 0, report.stderr
    assert "hours_no_eval" in report.stdout and "top1 >= 10%: epoch" in report.stdout
    exported = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "w.pt")])
    assert exported.exit_code == 0, exported.stderr
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_auto_finishes(built_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "train", *train_args(tmp_path, built_shards / "lmdb", out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in process.stderr:  # wait for the first evaluation, then stop the run
        lines.append(line)
        if line.startswith("epoch 0:"):
            process.send_signal(signal.SIGTERM)
            break
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, "".join(lines) + rest
    assert "train: interrupted: stopped" in rest and "--resume auto" in rest
    assert (out / "checkpoints" / "last.pt").exists()
    assert not (out / "checkpoints" / "final.pt").exists()
    resumed = subprocess.run(
        [*command, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2]
    assert (out / "checkpoints" / "final.pt").exists()

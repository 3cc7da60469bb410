"""GPU paths: bf16 autocast, fp16 with GradScaler, channels_last, torch.compile warm-up, bench,
and 2-rank NCCL DDP. Skipped without CUDA (and the DDP test without 2 GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.standin import StandInData
from train.bench.phases import BenchConfig, bench_phases
from train.plan.config import RunConfig
from train.run.main import run
from train.run.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
REPO = Path(__file__).resolve().parents[3]
PHASES = [
    {"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": [0.05, 0.2]},
    {"epochs": [1, 2], "prep_size": 160, "crop_size": 40, "batch_size": 4, "lr": [0.2, 0.0]},
]


def write_phases(tmp_path: Path, recipe=None) -> Path:
    path = tmp_path / "phases.json"
    path.write_text(
        json.dumps({"recipe": recipe or {"arch": "resnet18", "ema_decay": 0.9}, "phases": PHASES})
    )
    return path


@pytest.mark.parametrize(
    ("precision", "compile"), [("bf16", False), ("fp16", False), ("bf16", True)]
)
def test_cuda_run(tmp_path: Path, precision: str, compile: bool) -> None:
    config = RunConfig(
        write_phases(tmp_path),
        out_dir=tmp_path / "run",
        device="cuda",
        precision=precision,
        compile=compile,
        progress=False,
        tensorboard=False,
        log_every=2,
        checkpoint_every_steps=3,
    )
    last = run(config, StandInData())
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1] and last["top5"] == 100.0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert (checkpoint["scaler"] is not None) == (precision == "fp16")
    assert checkpoint["precision"] == precision


def test_cuda_bench_synthetic_and_real(tmp_path: Path) -> None:
    rows = bench_phases(
        BenchConfig(write_phases(tmp_path), device="cuda", steps=5, warmup_steps=2),
        data=StandInData(num_train=96),
    )
    assert all(r["synthetic_img_per_s"] > 0 and r["real_img_per_s"] > 0 for r in rows)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ddp_two_gpus(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "train" / "standin.py"),
        "--phases",
        str(write_phases(tmp_path)),
        "--out",
        str(tmp_path / "ddp"),
        "--device",
        "cuda",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["world_size"] for r in read_metrics(tmp_path / "ddp")] == [2, 2]

"""`train bench --optimizers`: a row per optimizer against SGD, the kernels each uses, and the
rows timm's optimizers get without timm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from train.bench import optim as bench_optim
from train.bench.optim import OPTIMIZER_ROWS, bench_optimizers, format_optimizer_rows
from train.bench.phases import BenchConfig


def bench_config(tmp_path: Path) -> BenchConfig:
    phases = tmp_path / "p.json"
    phases.write_text(
        '{"recipe": {"arch": "squeezenet1_1"}, "phases": [{"epochs": [0, 1], "prep_size": 160,'
        ' "crop_size": 32, "batch_size": 2, "lr": 0.1}]}'
    )
    return BenchConfig(phases, device="cpu", steps=1, warmup_steps=1, num_classes=3)


def test_bench_rows_without_timm_say_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setattr(bench_optim, "ROUNDS", 1)  # one model timed: seconds
    setting, rows = bench_optimizers(bench_config(tmp_path))
    assert [r["optimizer"] for r in rows] == [name for name, _, _ in OPTIMIZER_ROWS]
    assert [r["note"] for r in rows] == ["", "", "", "needs timm", "needs timm"]
    assert rows[0]["vs_sgd"] == 1.0 and rows[0]["step_ms"] > rows[0]["optimizer_step_ms"] > 0
    assert setting.startswith("squeezenet1_1, batch 2 x 32 px, 3 classes, fp32")
    assert "best of 1 rounds" in setting and "torch threads" in setting
    table = format_optimizer_rows(setting, rows).splitlines()
    assert table[1].split() == [
        "optimizer",
        "kernels",
        "ms/step",
        "x",
        "sgd",
        "optimizer.step()",
        "ms",
        "note",
    ]
    assert table[2].split()[:4] == ["sgd", "fused", f"{rows[0]['step_ms']:.1f}", "1.00"]
    assert table[-1].split() == ["lars", "-", "-", "-", "-", "needs", "timm"]


@pytest.mark.slow
def test_bench_times_every_optimizer_against_sgd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench_optim, "ROUNDS", 2)
    monkeypatch.setattr(bench_optim, "OPTIMIZER_STEP_CALLS", 2)
    _, rows = bench_optimizers(bench_config(tmp_path))
    assert [r["kernels"] for r in rows] == ["fused", "fused", "fused", "default", "default"]
    assert all(r["step_ms"] > r["optimizer_step_ms"] > 0 and r["vs_sgd"] > 0 for r in rows)

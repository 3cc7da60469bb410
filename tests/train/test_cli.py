"""`train` CLI: subcommands exist, library errors are one stderr line, dry run, wiring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from train.cli import app

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "phases" / "demo.json"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    assert result.exit_code != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("train: error: "), lines[0]
    return lines[0]


def write_phases(tmp_path: Path, phases, recipe=None, name="p.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"recipe": recipe or {"arch": "resnet18"}, "phases": phases}))
    return path


PHASE = {"epochs": [0, 2], "prep_size": 160, "crop_size": 64, "batch_size": 8, "lr": [0.1, 0.0]}


def test_subcommands_exist() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "bench", "bench-loader", "report", "export", "eval"):
        assert command in result.stdout


def test_dry_run_prints_the_per_epoch_table() -> None:
    result = invoke("run", "--phases", DEMO, "--dry-run")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("epoch"))
    assert lines[header].split()[:3] == ["epoch", "phase", "train_dir"]
    assert len(lines) - header - 2 == 8  # demo: 8 epochs, then the model check's line
    assert lines[-1] == "model: resnet18 builds and takes every crop of the schedule"
    assert "arch=resnet18" in result.stdout


@pytest.mark.parametrize(
    ("phases", "recipe", "expected"),
    [
        ([dict(PHASE, size=1)], None, "phase 0, key 'size': unknown key"),
        ([PHASE, dict(PHASE, epochs=[3, 4])], None, "phase 1, key 'epochs': gap"),
        ([PHASE, dict(PHASE, epochs=[1, 4])], None, "phase 1, key 'epochs': overlap"),
        ([dict(PHASE, crop_size=192)], None, "key 'crop_size': 192 > prep_size 160"),
        ([PHASE], {"arch": "resnet18", "lr_peak": 2}, "recipe key 'lr_peak': unknown"),
        ([PHASE], {"arch": "resnet9000"}, "recipe key 'arch': must name a torchvision"),
        ([PHASE], {"momentum": 1.5}, "recipe key 'momentum'"),
    ],
)
def test_bad_schedules_fail_with_one_line(tmp_path: Path, phases, recipe, expected) -> None:
    path = write_phases(tmp_path, phases, recipe)
    assert expected in error_line(invoke("run", "--phases", path, "--dry-run"))


def test_missing_shards_fail_before_training(tmp_path: Path) -> None:
    path = write_phases(tmp_path, [PHASE])
    line = error_line(invoke("run", "--phases", path, "--data", tmp_path / "shards", "--dry-run"))
    assert "phase 0 needs train shards train-160/ (prep_size 160)" in line
    line = error_line(
        invoke("run", "--phases", path, "--data", tmp_path / "shards", "--out", tmp_path / "run")
    )
    assert "train-160" in line and not (tmp_path / "run").exists()


def test_run_needs_data_and_valid_options(tmp_path: Path) -> None:
    path = write_phases(tmp_path, [PHASE])
    assert "--data is required" in error_line(invoke("run", "--phases", path))
    assert "expected top1=<percent>" in error_line(
        invoke("run", "--phases", path, "--target", "top3=50", "--dry-run")
    )
    assert "no such schedule file" in error_line(invoke("run", "--phases", tmp_path / "x.json"))
    assert "--decode must be one of cpu, gpu" in error_line(
        invoke("run", "--phases", path, "--decode", "dali", "--dry-run")
    )
    assert "--log-every must be a positive integer" in error_line(
        invoke("run", "--phases", path, "--log-every", "0", "--dry-run")
    )


def test_report_and_export_errors(tmp_path: Path) -> None:
    assert "no metrics.jsonl" in error_line(invoke("report", tmp_path))
    assert "no checkpoints/final.pt" in error_line(
        invoke("export", tmp_path, "--out", tmp_path / "w.pt")
    )


def test_bench_loader_last_line_is_machine_readable(monkeypatch, tmp_path: Path) -> None:
    import train.bench.loader

    calls = []

    def fake(data_dir, crop_size, batch_size, workers, num_batches, **kwargs):
        calls.append((data_dir, crop_size, batch_size, workers, num_batches, kwargs))
        return {"img_per_s": 1234.5, "batches": num_batches, "data_dir": str(data_dir)}

    monkeypatch.setattr(train.bench.loader, "bench_loader", fake)
    result = invoke(
        "bench-loader",
        "--data",
        tmp_path,
        "--crop-size",
        "128",
        "--batch-size",
        "16",
        "--workers",
        "3",
        "--batches",
        "7",
        "--decode",
        "cpu",
        "--val",
        "--rect",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "img_per_s=1234.5"
    assert calls[0][:5] == (tmp_path, 128, 16, 3, 7)
    assert calls[0][5]["val"] and calls[0][5]["rect"] and calls[0][5]["decode"] == "cpu"


def test_train_library_imports_neither_typer_nor_prep() -> None:
    code = (
        "import sys, train.run.main, train.run.epochs, train.run.report, train.export, "
        "train.bench.phases, train.bench.loader, train.bench.optim, train.plan.imagenet18; "
        "bad = [m for m in ('typer', 'prep') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bench_loader_bad_arguments_are_one_line(built_shards: Path) -> None:
    data = built_shards / "lmdb" / "train-160"
    base = [
        "bench-loader",
        "--data",
        data,
        "--crop-size",
        "32",
        "--batch-size",
        "4",
        "--batches",
        "1",
        "--warmup",
        "0",
        "--workers",
        "0",
    ]
    for extra, expected in (
        (["--workers", "-1"], "workers must be >= 0"),
        (["--crop-size", "0"], "crop_size must be >= 1"),
        (["--min-scale", "0"], "min_scale"),
        (["--min-scale", "2"], "min_scale"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--batches", "0"], "--batches >= 1"),
        (["--warmup", "-1"], "--warmup >= 0"),
        (["--decode", "xyz"], "decode must be one of"),
    ):
        assert expected in error_line(invoke(*base, *extra)), extra


def test_bench_loader_caps_workers_with_a_warning(built_shards: Path) -> None:
    result = invoke(
        "bench-loader",
        "--data",
        built_shards / "lmdb" / "train-160",
        "--crop-size",
        "32",
        "--batch-size",
        "4",
        "--batches",
        "1",
        "--warmup",
        "0",
        "--workers",
        "1000",
    )
    assert result.exit_code == 0, result.stderr
    assert "--workers 1000 is more than 4 per core" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("img_per_s=")


def test_dry_run_shows_evaluations_resize_and_init(tmp_path: Path) -> None:
    phase = {**PHASE, "epochs": [0, 5], "lr": 0.1, "val_crop_size": 64, "val_resize_size": 80}
    path = write_phases(tmp_path, [phase])
    args = ("run", "--phases", path, "--dry-run", "--eval-every", "2", "--init", tmp_path / "w.pth")
    result = invoke(*args, "--stop-at", "top1=75.9", "--stop-at", "top5=93")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        f"init: the model starts from {tmp_path / 'w.pth'} (not on a resume); warning: no such file"
        in lines
    )
    assert (
        "stop: at the first evaluation with top1 >= 75.9% and top5 >= 93% (final.pt, report)"
        in (lines)
    )
    assert "--stop-at 'top1'" in error_line(invoke(*args, "--stop-at", "top1"))
    header = next(i for i, line in enumerate(lines) if line.startswith("epoch"))
    names = lines[header].split()
    rows = [line.split() for line in lines[header + 1 : header + 6]]
    assert [row[names.index("val_resize")] for row in rows] == ["80"] * 5
    assert ["yes" in row for row in rows] == [False, True, False, True, True]  # rect_val: no

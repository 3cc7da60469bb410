"""bench/gpu_check.py (issue 12's first device call) rehearsed on CPU, so the one call a lent GPU
gets does not fail on a renamed flag or a moved file: its `train run` flags against the CLI
(fast), and the script itself at tiny size through inputs, the SIGKILL + resume check and the
final table (slow: three trainer processes)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from train.cli import app

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # as bench/gpu_check.py itself does for its siblings

gpu_check = importlib.import_module("gpu_check")


def train_run_options() -> set[str]:
    run = typer.main.get_command(app).commands["run"]
    return {opt for param in run.params for opt in param.opts + param.secondary_opts}


def test_every_flag_the_check_passes_exists_on_train_run(tmp_path: Path) -> None:
    args = gpu_check.parse_args(["--tiny", "--out", str(tmp_path)])
    base = gpu_check.train_command(args, tmp_path / "p.json", tmp_path / "s", tmp_path / "r", [])
    flags = [a for a in base if a.startswith("--")] + ["--resume"]
    flags += [a for _, extra, _ in gpu_check.RUN_ROWS for a in extra if a.startswith("--")]
    flags += [a for a in gpu_check.RESUME_FLAGS if a.startswith("--")]
    missing = sorted(set(flags) - train_run_options())
    assert not missing, f"bench/gpu_check.py passes flags `train run` lacks: {missing}"
    assert {"--decode", "--precision", "--compile", "--deterministic"} <= set(flags)


@pytest.mark.slow
def test_gpu_check_tiny_resumes_bit_identically_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the run-* rows are the same `train run` command as the resume check's (flags checked above)
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_check.py"),
            "--tiny",
            "--out",
            str(out),
            "--skip",
            "tests,bench,runs",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = {row["step"]: row for row in json.loads((out / "check.json").read_text())["steps"]}
    assert steps["inputs"]["status"] == "ok"
    assert not any(name.startswith("run-") for name in steps)  # skipped as asked
    # CPU: the killed + resumed run ends with exactly the uninterrupted run's weights
    assert steps["resume"]["status"] == "ok", steps["resume"]
    assert (
        "bit-identical: True" in steps["resume"]["detail"]
        and "epoch 0 step" in steps["resume"]["detail"]
    )
    assert "| resume | ok |" in result.stdout  # the table printed last


def test_the_gpu_call_runs_the_cuda_tests_of_every_test_folder() -> None:
    """tests/ has subfolders since issue 17: the GPU call must find their CUDA-marked files."""
    files = gpu_check.gpu_test_files(REPO / "tests")
    for expected in (
        "tests/train/engine/test_gpu.py",
        "tests/train/engine/test_grad_clip.py",
        "tests/train/data/test_augment_loaders.py",
    ):
        assert expected in files, files
    assert "tests/train/plan/test_schedule.py" not in files

"""bench/gpu_check.py (issue 12's first device call) rehearsed on CPU at tiny size, so the one
call a lent GPU gets does not fail on a renamed flag or a moved file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_runs_and_resumes_bit_identically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--out",
                             str(out), "--skip", "tests,bench"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = {row["step"]: row for row in json.loads((out / "check.json").read_text())["steps"]}
    assert steps["inputs"]["status"] == "ok"
    assert steps["run-decode-cpu"]["status"] == "ok" and "ep1" in steps["run-decode-cpu"]["detail"]
    assert {steps[name]["status"] for name in ("run-decode-gpu", "run-fp16", "run-compile")} == {"skip"}
    # CPU: the killed + resumed run ends with exactly the uninterrupted run's weights
    assert steps["resume"]["status"] == "ok", steps["resume"]
    assert "bit-identical: True" in steps["resume"]["detail"] and "epoch 0 step" in steps["resume"]["detail"]
    assert "| resume | ok |" in result.stdout  # the table printed last

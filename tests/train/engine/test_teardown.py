"""Process-group teardown: nothing holds the group when it is destroyed, and the wait is bounded.

The DDP test hung in CI: py-spy showed the main thread in ~ProcessGroupGloo (reached from
~Reducer, i.e. the DDP model freed after destroy_process_group) joining a gloo worker that
waited for the GIL to free a finished broadcast's tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from tests.train.standin import StandInData, quick_config
from train.engine import dist
from train.errors import TrainError
from train.run import epochs
from train.run.main import run

REPO = Path(__file__).resolve().parents[3]
PHASES = {
    "recipe": {"arch": "resnet18"},
    "phases": [{"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": 0.1}],
}


@pytest.mark.parametrize("fails", [False, True])
def test_the_model_is_freed_before_the_process_group_is_destroyed(
    tmp_path: Path, monkeypatch, fails: bool
) -> None:
    built, alive_at_shutdown = [], []
    real_build = epochs.build_trainer

    def build(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        built.append(weakref.ref(trainer))
        return trainer

    def fake_shutdown(env) -> None:
        alive_at_shutdown.append([ref() is not None for ref in built])

    def broken_epoch(self):
        raise TrainError("epoch 0: broken")

    monkeypatch.setattr(epochs, "build_trainer", build)
    monkeypatch.setattr(dist, "shutdown", fake_shutdown)
    if fails:
        monkeypatch.setattr(epochs.EpochLoop, "train_epoch", broken_epoch)
    (tmp_path / "phases.json").write_text(json.dumps(PHASES))
    config = quick_config(phases_path=tmp_path / "phases.json", out_dir=tmp_path / "run")
    if fails:
        with pytest.raises(TrainError, match="broken"):
            run(config, StandInData())
    else:
        run(config, StandInData())
    assert alive_at_shutdown == [[False]]


BOUNDED = """
import sys, time
import torch, torch.distributed as torch_dist
from train.engine import dist
torch_dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
env = dist.DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
torch_dist.destroy_process_group = lambda: time.sleep(600)  # a teardown that never returns
dist.shutdown(env, seconds=1)
print("returned")
"""


def test_a_teardown_that_never_returns_ends_the_process_within_the_bound(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BOUNDED, str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "returned" not in done.stdout
    assert "Timeout (0:00:01)!" in done.stderr, done.stderr[-2000:]

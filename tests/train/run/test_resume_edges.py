"""Resume refusals a careless edit invites: a step past its epoch's end, a shortened schedule."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.train.run.test_run_dir import PHASES, config, write_phases
from tests.train.standin import StandInData
from train.errors import TrainError
from train.run.main import run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A complete 2-epoch run (4 steps an epoch): copy before use."""
    tmp_path = tmp_path_factory.mktemp("finished")
    run(config(tmp_path), StandInData())
    return tmp_path / "run"


def test_a_checkpoint_step_beyond_its_epoch_is_refused(finished_run: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    last = out / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    saved["epoch"], saved["step"] = 1, 9  # epoch 1 has 4 steps
    torch.save(saved, last)
    (out / "checkpoints" / "final.pt").unlink()
    with pytest.raises(TrainError, match=r"last.pt: step 9 lies beyond epoch 1's 4 steps"):
        run(config(tmp_path, resume="auto"), StandInData())
    assert not (out / "checkpoints" / "final.pt").exists()  # not called done


def test_a_shortened_schedule_lists_the_change_not_complete(
    finished_run: Path, tmp_path: Path
) -> None:
    shutil.copytree(finished_run, tmp_path / "run")
    one_epoch = write_phases(tmp_path / "one.json", phases=[dict(PHASES[0], epochs=[0, 1])])
    with pytest.raises(
        TrainError,
        match=r"last.pt: changed since this checkpoint: "
        r"schedule \(phase 0: epochs \[0, 2\] -> \[0, 1\]\)",
    ):
        run(config(tmp_path, phases_path=one_epoch, resume="auto"), StandInData())
    with pytest.raises(TrainError, match=r"last.pt: epoch 2 step 0 lies beyond this schedule's 1"):
        run(
            config(tmp_path, phases_path=one_epoch, resume="auto", allow_changed=True),
            StandInData(),
        )


def test_resuming_a_complete_run_with_its_schedule_still_says_complete(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    shutil.copytree(finished_run, tmp_path / "run")
    assert run(config(tmp_path, resume="auto"), StandInData()) == {}
    assert "already complete (2 epochs)" in capsys.readouterr().err

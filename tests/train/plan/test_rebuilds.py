"""One rule for loader rebuilds: what `train run --dry-run` prints in its "loaders" column is
what a run does to its loaders, epoch by epoch (counted at the DataSource, not taken from the
rule's own text)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from tests.train.standin import StandInData
from train.plan.config import RunConfig
from train.run.main import run

PHASES = [
    {"epochs": [0, 2], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": 0.05},
    {
        "epochs": [2, 3],
        "prep_size": 160,
        "crop_size": 40,
        "batch_size": 8,
        "lr": 0.05,
        "min_scale": 0.5,
    },  # train crop and val crop in place
    {
        "epochs": [3, 4],
        "prep_size": 160,
        "crop_size": 40,
        "batch_size": 6,
        "lr": 0.05,
        "min_scale": 0.5,
    },  # new batch sampler: both rebuilt
    {"epochs": [4, 5], "prep_size": 320, "crop_size": 48, "batch_size": 6, "lr": 0.05},
    {
        "epochs": [5, 6],
        "prep_size": 320,
        "crop_size": 48,
        "batch_size": 6,
        "lr": 0.05,
        "rect_val": True,
    },  # val only
    {
        "epochs": [6, 9],
        "prep_size": 320,
        "crop_size": [32, 48],
        "crop_multiple": 8,
        "batch_size": 6,
        "lr": 0.05,
        "rect_val": True,
        "val_crop_size": 48,
    },  # a ramp, in place
]
ACTIONS = {
    "train": "train_loader",
    "val": "val_loader",
    "crop_size": "set_crop",
    "min_scale": "set_crop",
    "val_crop_size": "set_crop_size",
    "val_resize_size": "set_crop_size",
}


def expected_actions(loaders: str) -> set[str]:
    """The dry-run's words -> the loader calls they promise."""
    actions = set()
    for part in filter(None, (p.strip() for p in loaders.split(";"))):
        verb, _, what = (
            part.partition(" ")
            if not part.startswith("in place")
            else ("in place", "", part.split(":", 1)[1])
        )
        names = (
            what.split("+")
            if verb in ("build", "rebuild")
            else [name.strip() for name in what.split(",")]
        )
        actions |= {ACTIONS[name] for name in names}
    return actions


def dry_run_loaders(config: RunConfig) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(RunConfig(**{**config.__dict__, "dry_run": True}))
    lines = out.getvalue().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("epoch"))
    column = lines[header].index("loaders")
    rows = [line for line in lines[header + 1 :] if not line.startswith("model: ")]
    return [line[column:].strip() for line in rows]


def actions_per_epoch(calls: list[tuple]) -> list[set[str]]:
    """Loader calls grouped by the epoch they prepared (each epoch ends with set_epoch)."""
    epochs, current = [], set()
    for call in calls:
        if call[0] == "set_epoch":
            epochs.append(current)
            current = set()
        elif not call[0].startswith("close"):
            current.add(call[0])
    return epochs


def test_expected_actions_reads_the_column() -> None:
    assert expected_actions("build train+val") == {"train_loader", "val_loader"}
    assert expected_actions("rebuild val; in place: crop_size") == {"val_loader", "set_crop"}
    assert expected_actions("in place: crop_size, min_scale, val_crop_size") == {
        "set_crop",
        "set_crop_size",
    }
    assert expected_actions("") == set()


@pytest.mark.slow
def test_a_run_rebuilds_exactly_what_the_dry_run_says(tmp_path: Path) -> None:
    phases = tmp_path / "p.json"
    phases.write_text(json.dumps({"recipe": {"arch": "resnet18"}, "phases": PHASES}))
    config = RunConfig(
        phases,
        out_dir=tmp_path / "run",
        device="cpu",
        progress=False,
        tensorboard=False,
        recipe={"eval_every": 100},
        log_every=4,
        threads=1,
    )
    column = dry_run_loaders(config)
    assert column[0] == "build train+val" and column[1] == "" and "rebuild" not in column[7]
    data = StandInData(num_train=24, num_val=6, prep_sizes=(160, 320))
    run(config, data)
    done = actions_per_epoch(data.calls)
    assert len(done) == len(column) == 9
    for epoch, (words, actions) in enumerate(zip(column, done)):
        assert actions == expected_actions(words), (epoch, words, actions)
    crops = [call[1] for call in data.calls if call[0] == "set_crop"]
    assert crops[-3:] == [32, 40, 48]  # the ramp, epoch by epoch, with the same workers

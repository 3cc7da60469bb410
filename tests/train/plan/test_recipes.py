"""Every shipped recipe runs as published: its first 20 steps on CPU at tiny size (crop 32 px,
batch 2, stand-in data) through train run's own objects, with every recipe key honoured (no
note that a key is ignored, unimplemented or without effect)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.standin import StandInData
from train.engine.dist import init_distributed
from train.plan.config import RunConfig
from train.plan.phases import load_schedule
from train.run.epochs import EpochLoop
from train.run.main import load_inputs
from train.run.signals import StopFlag

REPO = Path(__file__).resolve().parents[3]
RECIPES = sorted((REPO / "phases").glob("*.json"))
STEPS, BATCH, CROP = 20, 2, 32
IGNORED = ("ignor", "not implement", "no effect", "unknown", "warning")


def tiny_copy(path: Path, out: Path) -> Path:
    """The recipe as published, its phases shrunk: same keys, tiny crops and batches."""
    loaded = load_schedule(path)
    phases = []
    for phase in loaded.schedule.to_dicts():
        ramp = isinstance(phase["crop_size"], list)
        phase.update(
            prep_size=160,
            val_prep_size=160,
            batch_size=BATCH,
            val_crop_size=CROP,
            crop_size=[CROP, CROP + 16] if ramp else CROP,
        )
        phases.append(phase)
    out.write_text(
        json.dumps({"recipe": dict(loaded.recipe), "note": loaded.note, "phases": phases})
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_its_first_steps_with_every_key_honoured(
    path: Path, tmp_path: Path, capsys
) -> None:
    config = RunConfig(
        tiny_copy(path, tmp_path / path.name),
        out_dir=tmp_path / "run",
        device="cpu",
        progress=False,
        tensorboard=False,
        log_every=5,
        threads=1,
    )
    loaded, recipe = load_inputs(config)
    accum = loaded.schedule.phases[0].accum_steps
    data = StandInData(num_train=STEPS * BATCH * accum, num_val=6)
    training = EpochLoop(config, loaded, recipe, data, init_distributed("cpu"), 3, StopFlag())
    try:
        record = training.train_epoch()
    finally:
        training.loaders.close()
        training.log.close()
    assert training.state.step == STEPS and record["train_loss"] > 0
    said = capsys.readouterr().err.lower()
    assert not [word for word in IGNORED if word in said], said


def test_torchvision_archs_read_from_source_equal_list_models() -> None:
    import torchvision

    from train.plan.config import torchvision_archs

    assert torchvision_archs() == set(torchvision.models.list_models(module=torchvision.models))

"""CPU smoke run on stand-in data: run directory contents, report, export, NaN stop, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from tests.train.standin import StandInData, quick_config
from train.errors import CheckpointError, TrainError
from train.export import export, plain_state_dict
from train.plan.config import RunConfig
from train.run.main import run
from train.run.metrics import read_metrics
from train.run.report import report

RECIPE = {
    "arch": "resnet18",
    "weight_decay": 5e-5,
    "label_smoothing": 0.1,
    "targets": {"top1": 50.0},
}
PHASES = [
    {"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": [0.05, 0.2]},
    {"epochs": [1, 2], "prep_size": 160, "crop_size": 40, "batch_size": 6, "lr": [0.2, 0.0]},
]


def write_phases(path: Path, phases=PHASES, recipe=RECIPE) -> Path:
    path.write_text(json.dumps({"recipe": recipe, "phases": phases}))
    return path


def config(tmp_path: Path, **overrides) -> RunConfig:
    return quick_config(
        **{
            "phases_path": write_phases(tmp_path / "phases.json"),
            "out_dir": tmp_path / "run",
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("smoke")
    last = run(
        config(tmp_path, recipe={"ema_decay": 0.9, "val_flip_tta": True}, tensorboard=True),
        StandInData(),
    )
    return tmp_path / "run", last


def test_tensorboard_events_read_back_with_tensorboards_reader(smoke_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = smoke_run
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/top1", "epoch/top5", "epoch/train_loss", "train/loss", "train/lr"} <= tags
    records = read_metrics(run_dir)
    top1 = events.Scalars("epoch/top1")
    assert [e.step for e in top1] == [1, 2]  # epochs completed
    assert [e.value for e in top1] == pytest.approx([r["top1"] for r in records])
    lrs = events.Scalars("train/lr")
    assert lrs and lrs[-1].value == pytest.approx(records[-1]["lr"])


def test_missing_tensorboard_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(
        TrainError,
        match=r"TensorBoard events need the tensorboard package .*"
        r"--no-tensorboard",
    ):
        run(config(tmp_path, tensorboard=True), StandInData())
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_smoke_run_writes_metrics_config_and_event_log(smoke_run) -> None:
    run_dir, last = smoke_run
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        for key in (
            "epoch",
            "hours",
            "top1",
            "top5",
            "train_loss",
            "lr",
            "img_per_s",
            "data_wait",
            "train_hours",
            "ema_top1",
        ):
            assert key in record, key
        assert 0 <= record["top1"] <= 100 and record["top5"] == 100.0  # 3 classes
        assert record["img_per_s"] > 0 and 0 <= record["data_wait"] <= 1
        assert record["val_images"] == 18  # the stand-in's whole validation set, each image once
    assert records[0]["hours"] < records[1]["hours"]
    assert [r["flip_tta"] for r in records] == [False, True]  # flip averaging at the end only
    assert [r["batch_size"] for r in records] == [8, 6]  # per GPU, changed between phases
    assert records[1]["lr"] == pytest.approx(0.2 / 8)  # last of 48 / 6 = 8 steps, heading to 0
    assert last["epoch"] == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"]["arch"] == "resnet18" and config["num_classes"] == 3
    assert config["schedule"][1]["crop_size"] == 40 and config["environment"]["torch"]
    assert "git_sha" in config and config["args"]["seed"] == 0
    event_log = (run_dir / "event.log").read_text()
    assert event_log.startswith("~~epoch\thours\ttop1\ttop5")
    assert event_log.count("Dataset changed.") == 2 and "~~1\t" in event_log
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "last.pt",
        "final.pt",
        "best.pt",
    }


def test_report_prints_time_to_accuracy(smoke_run, tmp_path: Path) -> None:
    run_dir, _ = smoke_run
    text = report([run_dir], {"top5": 90.0, "top1": 101.0}, plot_path=tmp_path / "c.png")
    lines = text.splitlines()
    assert lines[1].split()[:5] == ["epoch", "hours", "hours_no_eval", "top1", "top5"]
    assert "top5 >= 90%: epoch 0" in text and "top1 >= 101%: not reached" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "needs matplotlib" in text
    else:
        assert (tmp_path / "c.png").stat().st_size > 0
    assert "top1 >= 50%" in report([run_dir], None, plot_path=tmp_path / "d.png")  # recipe's


@pytest.mark.parametrize("ema", [False, True])
def test_export_loads_strictly_into_torchvision(smoke_run, tmp_path: Path, ema: bool) -> None:
    run_dir, _ = smoke_run
    info = export(run_dir, tmp_path / "w.pt", ema=ema)
    assert info["source"].endswith("final.pt") and info["arch"] == "resnet18"
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))  # strict
    checkpoint = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)
    source = plain_state_dict(checkpoint["ema"] if ema else checkpoint["model"])
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in source)


def test_plain_state_dict_strips_wrapper_prefixes() -> None:
    weight = torch.ones(2)
    state = {
        "module._orig_mod.fc.weight": weight,
        "_orig_mod.module.fc.bias": weight,
        "n_averaged": torch.tensor(3),
    }
    assert list(plain_state_dict(state)) == ["fc.weight", "fc.bias"]


def test_rerun_into_a_finished_run_is_refused_or_a_no_op(smoke_run, tmp_path: Path) -> None:
    run_dir, _ = (
        smoke_run  # its recipe: a rerun with another one lists the changes (test_resume_edges)
    )
    base = config(tmp_path, out_dir=run_dir, recipe={"ema_decay": 0.9, "val_flip_tta": True})
    with pytest.raises(CheckpointError, match="already holds a run"):
        run(base, StandInData())
    before = (run_dir / "metrics.jsonl").read_text()
    assert run(RunConfig(**{**base.__dict__, "resume": "auto"}), StandInData()) == {}
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_nan_loss_stops_with_a_clear_message(tmp_path: Path) -> None:
    phases = [dict(PHASES[0], lr=[1e30, 1e30]), PHASES[1]]
    cfg = config(
        tmp_path,
        phases_path=write_phases(tmp_path / "nan.json", phases),
        checkpoint_every_steps=100,
    )
    with pytest.raises(
        TrainError,
        match=r"loss is (nan|inf) at epoch 0 step \d+ .*no "
        r"checkpoint was written yet",
    ):
        run(cfg, StandInData())
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path: Path, monkeypatch) -> None:
    """A step can turn the weights to inf from a finite loss; the next save must refuse them
    and leave the last good checkpoint in place."""
    from train.engine.step import ModelStep

    real_step, steps_done = ModelStep.accumulate, []

    def poisoning_step(self, micro_batches, lr, seeds):
        loss = real_step(self, micro_batches, lr, seeds)
        steps_done.append(1)
        if len(steps_done) == 4:  # right after the 4th step, before the save that follows it
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return loss

    monkeypatch.setattr(ModelStep, "accumulate", poisoning_step)
    with pytest.raises(
        TrainError,
        match=r"weights are no longer finite at epoch 0 step 4; .*"
        r"the last good checkpoint is",
    ):
        run(config(tmp_path, checkpoint_every_steps=2), StandInData())
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] == 2
    assert all(
        torch.isfinite(value).all()
        for value in saved["model"].values()
        if value.is_floating_point()
    )


def test_sync_bn_and_fp16_need_cuda(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="--sync-bn needs CUDA"):
        run(config(tmp_path, sync_bn=True), StandInData())
    from train.errors import TrainError as PrecisionError

    with pytest.raises(PrecisionError, match="fp16 needs CUDA"):
        run(config(tmp_path, precision="fp16", out_dir=tmp_path / "r2"), StandInData())


def test_report_uses_the_targets_the_run_was_started_with(tmp_path: Path) -> None:
    from train.run.report import run_targets

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "recipe": {"targets": {"top1": 50.0, "top5": 80.0}},
                "args": {"targets": [["top1", 70.0]]},
            }
        )
    )
    assert run_targets(tmp_path) == {"top1": 70.0, "top5": 80.0}

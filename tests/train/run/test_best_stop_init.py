"""best.pt, --stop-at, the eval schedule and "init" weights, through runs on the stand-in data."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import torchvision

from tests.train.standin import StandInData, quick_config
from train.engine.init_weights import init_from
from train.engine.model import build_model
from train.errors import TrainError
from train.plan.config import Recipe
from train.run.checkpoint import load, save_run
from train.run.epochs import EpochLoop
from train.run.main import run
from train.run.metrics import read_metrics
from train.run.report import report
from train.run.resume import changes_since

PHASES = [{"epochs": [0, 4], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": 0.05}]


def config(tmp_path: Path, recipe=None, phases=PHASES, **fields):
    path = tmp_path / "phases.json"
    path.write_text(
        json.dumps({"recipe": {"arch": "resnet18", **(recipe or {})}, "phases": phases})
    )
    return quick_config(phases_path=path, out_dir=tmp_path / "run", **fields)


@pytest.fixture
def scripted_top1(monkeypatch):
    """EpochLoop.evaluate returns these top-1s in turn (the model's own pass is not needed)."""

    def script(values):
        values = iter(values)

        def evaluate(self, module, flip):
            return {"top1": next(values), "top5": 100.0, "val_loss": 1.0, "val_images": 18}

        monkeypatch.setattr(EpochLoop, "evaluate", evaluate)

    return script


def small_data() -> StandInData:
    return StandInData(num_train=16, num_val=6)  # 2 steps an epoch: the runs are about epochs


def checkpoint_epoch(run_dir: Path, name: str) -> int:
    return load(run_dir / "checkpoints" / name)["epoch"]


def test_best_pt_holds_the_highest_top1_under_an_eval_schedule(tmp_path, scripted_top1) -> None:
    scripted_top1([50.0, 80.0, 80.0])  # evaluations after epochs 0, 2 and 3
    run(config(tmp_path, {"eval_every": 2, "eval_offset": 1}), small_data())
    records = read_metrics(tmp_path / "run")
    assert [r["top1"] for r in records] == [50.0, None, 80.0, 80.0]
    assert checkpoint_epoch(tmp_path / "run", "best.pt") == 3  # after epoch 2 (a tie keeps it)
    assert checkpoint_epoch(tmp_path / "run", "final.pt") == 4
    best = load(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    final = load(tmp_path / "run" / "checkpoints" / "final.pt")["model"]
    assert not torch.equal(best["conv1.weight"], final["conv1.weight"])


def test_stop_at_ends_the_run_with_a_final_checkpoint_and_report(tmp_path, scripted_top1) -> None:
    scripted_top1([50.0, 76.0, 90.0, 95.0])
    cfg = config(tmp_path, stop_at=(("top1", 75.9), ("top5", 93.0)))
    last = run(cfg, small_data())
    run_dir = tmp_path / "run"
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1] and last["epoch"] == 1
    assert "stopped_at" not in records[0]
    assert records[1]["stopped_at"] == {"top1": 75.9, "top5": 93.0}
    assert checkpoint_epoch(run_dir, "final.pt") == checkpoint_epoch(run_dir, "last.pt") == 2
    assert "Stopped early after epoch 1 (--stop-at): top1 76.00% >= 75.9%" in (
        (run_dir / "event.log").read_text()
    )
    text = report([run_dir], {"top1": 75.9}, tmp_path / "curves.png")
    assert "top1 >= 75.9%: epoch 1 (76.00%)" in text


def test_stop_at_on_a_real_evaluation(tmp_path) -> None:
    # 3 classes: top-5 is 100% at every evaluation, so the first one stops the run
    run(config(tmp_path, stop_at=(("top5", 50.0),)), small_data())
    records = read_metrics(tmp_path / "run")
    assert len(records) == 1 and records[0]["top5"] == 100.0 and "stopped_at" in records[0]
    assert checkpoint_epoch(tmp_path / "run", "final.pt") == 1


def test_stop_at_unreached_runs_to_the_end(tmp_path, scripted_top1) -> None:
    scripted_top1([50.0, 60.0, 70.0, 99.0])  # the last reaches it: a normal end
    run(config(tmp_path, stop_at=(("top1", 75.9),)), small_data())
    records = read_metrics(tmp_path / "run")
    assert len(records) == 4 and not any("stopped_at" in r for r in records)


# --- init ---------------------------------------------------------------------------------


def resnet18(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(Recipe.from_mapping({"arch": "resnet18"}), num_classes)


def test_init_loads_a_state_dict_exactly(tmp_path) -> None:
    source = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "w.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # a DDP save
    model = resnet18(3)
    assert init_from(model, path, "resnet18") == [f"init: weights from {path} (resnet18)"]
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_init_remakes_a_head_for_another_class_count(tmp_path) -> None:
    source = torchvision.models.resnet18()  # 1000 classes
    path = tmp_path / "tv.pth"
    torch.save(source.state_dict(), path)
    model, fresh = resnet18(10), resnet18(10)
    notes = init_from(model, path, "resnet18")
    assert notes[-1] == "init: fc re-made for 10 classes (weights had 1000)"
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.fc.weight, fresh.fc.weight)  # the constructor's init, not loaded


def test_init_refuses_another_backbone_in_one_line(tmp_path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), path)
    with pytest.raises(TrainError) as refused:
        init_from(resnet18(3), path, "resnet18")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"init {path}: weights do not fit the model (unexpected layer1.2.")


def test_init_of_a_timm_model(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    path = tmp_path / "timm.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), path)
    model = build_model(Recipe.from_mapping({"arch": "timm/test_resnet"}), 3)
    notes = init_from(model, path, "timm/test_resnet")
    assert notes[-1] == "init: fc re-made for 3 classes (weights had 1000)"


def test_a_run_starts_from_init_and_a_resume_does_not_reapply_it(tmp_path, capsys) -> None:
    weights = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    phases = [{**PHASES[0], "epochs": [0, 1], "lr": 0.0}]
    cfg = config(tmp_path, {"init": str(weights), "weight_decay": 0.0}, phases)
    run(cfg, small_data())
    assert "init: fc re-made for 3 classes (weights had 1000)" in capsys.readouterr().err
    saved = load(tmp_path / "run" / "checkpoints" / "final.pt")["model"]
    source = torch.load(weights)
    assert torch.equal(saved["conv1.weight"], source["conv1.weight"])  # lr 0: as loaded
    weights.unlink()  # a resume reads the checkpoint only
    assert (
        run(
            config(tmp_path, {"init": str(weights), "weight_decay": 0.0}, phases, resume="auto"),
            small_data(),
        )
        == {}
    )
    assert "init:" not in capsys.readouterr().err


def test_init_from_a_checkpoint_of_another_arch_is_refused(tmp_path) -> None:
    run(config(tmp_path, phases=[{**PHASES[0], "epochs": [0, 1]}]), small_data())
    final = tmp_path / "run" / "checkpoints" / "final.pt"
    model = build_model(Recipe.from_mapping({"arch": "resnet34"}), 3)
    with pytest.raises(TrainError, match="a checkpoint of resnet18, this run trains resnet34"):
        init_from(model, final, "resnet34")
    same = resnet18(3)
    assert "resnet18 checkpoint, epoch 1" in init_from(same, final, "resnet18")[0]
    for key, value in load(final)["model"].items():  # the model's weights, not the EMA's
        assert torch.equal(same.state_dict()[key], value), key


def test_a_missing_init_file_is_refused_before_the_run_directory_is_touched(tmp_path) -> None:
    cfg = config(tmp_path, {"init": str(tmp_path / "absent.pth")})
    with pytest.raises(TrainError, match=r"^init: .*absent\.pth: no such weights file$"):
        run(cfg, small_data())
    assert not (tmp_path / "run").exists()


def test_a_resume_need_not_repeat_init() -> None:
    """init is read at the start only: a resume without it (or with another) is no change."""
    recipe = Recipe.from_mapping({"arch": "resnet18"}).to_dict()
    identity = {"recipe": recipe, "schedule": [], "seed": 0}
    saved = {**identity, "recipe": {**recipe, "init": "/weights/tv.pth"}}
    assert changes_since(saved, identity) == []
    assert changes_since(saved, {**identity, "recipe": {**recipe, "lr_scale": 2}}) != []


def step_in(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_best_and_final_share_last_pts_bytes_and_keep_them(tmp_path, monkeypatch) -> None:
    """final.pt/best.pt are hard links of the last.pt just written (no second write); the next
    save renames a new last.pt in, the links keep theirs; no hard links: a copy."""
    save_run({"global_step": 1}, tmp_path, final=False, best=True)
    directory = tmp_path / "checkpoints"
    assert (directory / "best.pt").stat().st_ino == (directory / "last.pt").stat().st_ino
    save_run({"global_step": 2}, tmp_path, final=True)
    assert step_in(directory / "best.pt") == 1
    assert step_in(directory / "final.pt") == 2
    assert step_in(directory / "last.pt") == 2

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    save_run({"global_step": 3}, tmp_path, final=False, best=True)
    assert step_in(directory / "best.pt") == 3
    assert (directory / "best.pt").stat().st_ino != (directory / "last.pt").stat().st_ino
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "final.pt", "last.pt"]

"""`train run` with color_jitter, random_erasing and repeat_aug on real shards: the recipe keys
reach the loader, and the whole run is a function of its seed, whatever the workers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from train.cli import app
from train.data.device_ops import DeviceOps

RECIPE = {"arch": "resnet18", "color_jitter": 0.4, "random_erasing": 0.25, "repeat_aug": 3}
PHASES = [{"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 4, "lr": 0.05}]


def run_once(tmp_path: Path, data: Path, name: str, workers: str) -> dict:
    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps({"recipe": RECIPE, "phases": PHASES}))
    out = tmp_path / name
    result = CliRunner().invoke(
        app,
        [
            "run",
            *("--phases", phases, "--data", data, "--out", out, "--workers", workers),
            *("--no-progress", "--no-tensorboard", "--threads", "1"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "ignored" not in result.stderr and "not implemented" not in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert {key: config["recipe"][key] for key in RECIPE} == RECIPE
    return torch.load(out / "checkpoints" / "final.pt", weights_only=True)["model"]


def test_an_augmented_run_is_its_seeds_under_any_workers(built_shards, tmp_path, monkeypatch):
    applied = []  # (jittered images, erased images) per batch the prefetcher received
    real_on_float = DeviceOps.on_float

    def on_float(self, x):
        applied.append((len(self.jitter_factors), int((self.erase_boxes[:, 2] > 0).sum())))
        return real_on_float(self, x)

    monkeypatch.setattr(DeviceOps, "on_float", on_float)
    in_process = run_once(tmp_path, built_shards / "lmdb", "a", "0")
    assert len(applied) == 4 and all(jittered == 4 for jittered, _ in applied)  # 18 // 4 batches
    assert sum(erased for _, erased in applied) > 0
    with_workers = run_once(tmp_path, built_shards / "lmdb", "b", "2")
    assert len(applied) == 8
    assert in_process.keys() == with_workers.keys()
    assert all(torch.equal(in_process[k], with_workers[k]) for k in in_process)

"""`train eval` against a run's own final evaluation (real shards, same loaders), the export
round trip, and its one-line refusals; `--checkpoint best`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from tests.train.standin import quick_config
from train.cli import app
from train.run.main import run
from train.run.metrics import read_metrics

REPO = Path(__file__).resolve().parents[3]
RECIPE = {"arch": "resnet18", "ema_decay": 0.5}
PHASES = [
    {"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 6, "lr": 0.1},
    # the final evaluation's center crop: 32 px from a 48 px resize (the default would be 37)
    {
        "epochs": [1, 2],
        "prep_size": 160,
        "crop_size": 32,
        "batch_size": 6,
        "lr": [0.1, 0.0],
        "val_resize_size": 48,
    },
]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def eval_json(*args) -> dict:
    result = invoke("eval", *args, "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # ONE JSON line
    return json.loads(lines[0])


def error_line(*args) -> str:
    result = invoke("eval", *args, "--workers", "0", "--device", "cpu")
    assert result.exit_code == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def real_run(built_shards, tmp_path_factory) -> tuple[Path, Path]:
    """Two epochs of resnet18 on the session's real shards (18 train, 12 val images)."""
    tmp = tmp_path_factory.mktemp("eval")
    phases = tmp / "phases.json"
    phases.write_text(json.dumps({"recipe": RECIPE, "phases": PHASES}))
    data = built_shards / "lmdb"
    run(quick_config(phases_path=phases, out_dir=tmp / "run", data_dir=data, workers=0))
    return tmp / "run", data


def test_eval_of_a_run_equals_its_final_evaluation(real_run) -> None:
    run_dir, data = real_run
    final = read_metrics(run_dir)[-1]
    out = eval_json(run_dir, "--data", data)
    assert out["source"].endswith("final.pt") and out["epochs_done"] == 2
    assert out["crop"] == "center 32 (resize 48)"  # the last phase's, read from the checkpoint
    assert out["images"] == final["val_images"] == 12
    assert (out["top1"], out["top5"]) == (final["top1"], final["top5"])
    assert out["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    ema = eval_json(run_dir, "--data", data, "--ema")
    assert (ema["top1"], ema["top5"]) == (final["ema_top1"], final["ema_top5"])
    # another resize is another evaluation: the run's numbers came from the 48 px resize
    other = eval_json(run_dir, "--data", data, "--resize-size", "37")
    assert other["crop"] == "center 32 (resize 37)"
    assert other["val_loss"] != pytest.approx(final["val_loss"], rel=1e-6)


def test_export_round_trip_and_best(real_run, tmp_path: Path) -> None:
    run_dir, data = real_run
    final = read_metrics(run_dir)[-1]
    exported = tmp_path / "w.pth"
    assert invoke("export", run_dir, "--out", exported).exit_code == 0
    out = eval_json(
        exported,
        "--arch",
        "resnet18",
        "--data",
        data / "val-160",
        "--crop-size",
        "32",
        "--resize-size",
        "48",
    )
    assert (out["top1"], out["top5"]) == (final["top1"], final["top5"]) and out[
        "epochs_done"
    ] is None
    records = read_metrics(run_dir)
    best_epoch = max(records, key=lambda r: r["top1"])["epoch"]  # first of the highest
    best = eval_json(run_dir, "--checkpoint", "best", "--data", data)
    exported_best = invoke("export", run_dir, "--checkpoint", "best", "--out", tmp_path / "b.pth")
    assert "best.pt" in exported_best.stdout
    assert best["source"].endswith("best.pt") and best["epochs_done"] == best_epoch + 1
    assert best["top1"] == records[best_epoch]["top1"]


def test_one_line_refusals(real_run, tmp_path: Path) -> None:
    run_dir, data = real_run
    assert "no such run directory or weights file" in error_line(tmp_path / "x.pth", "--data", data)
    assert "no checkpoints/best.pt" in error_line(tmp_path, "--checkpoint", "best", "--data", data)
    assert "--checkpoint picks a run directory's" in error_line(
        run_dir / "checkpoints" / "last.pt", "--checkpoint", "best", "--data", data
    )
    thousand = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18().state_dict(), thousand)
    val = data / "val-160"
    assert "name its model with --arch" in error_line(thousand, "--data", val)
    assert "weights for 1000 classes, the shards have 3" in error_line(
        thousand, "--arch", "resnet18", "--data", val
    )
    wrong = error_line(thousand, "--arch", "resnet34", "--data", val)
    assert "weights do not fit the model (missing layer1.2." in wrong
    assert "--arch: must name a torchvision" not in wrong
    assert "must name a torchvision classification model" in error_line(
        thousand, "--arch", "resnet9000", "--data", val
    )
    assert "--ema needs a shardtrain checkpoint" in error_line(
        thousand, "--arch", "resnet18", "--data", val, "--ema"
    )
    assert "is no shard directory" in error_line(thousand, "--arch", "resnet18", "--data", data)
    assert "'train' images, not 'val'" in error_line(run_dir, "--data", data / "train-160")
    assert "--checkpoint 'first'" in error_line(run_dir, "--checkpoint", "first", "--data", data)
    assert "--precision must be one of" in error_line(run_dir, "--data", data, "--precision", "fp8")
    assert "--crop-size must be >= 1, got 0" in error_line(
        run_dir, "--data", data, "--crop-size", "0"
    )


def test_eval_of_a_timm_state_dict(real_run, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    _, data = real_run
    path = tmp_path / "timm.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    args = ("--arch", "timm/test_resnet", "--data", data / "val-160", "--crop-size", "32")
    out = eval_json(path, *args, "--rect")
    assert out["images"] == 12 and out["crop"] == "rect 32" and out["arch"] == "timm/test_resnet"
    assert "weights do not fit the model" in error_line(path, "--arch", "resnet18", *args[2:])


@pytest.mark.slow
def test_two_gloo_ranks_count_each_image_once(real_run) -> None:
    """12 images in batches of 5 over 2 ranks: rank 1's second batch is empty, not padded."""
    run_dir, data = real_run
    single = eval_json(run_dir, "--data", data, "--batch-size", "5")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        "eval",
        str(run_dir),
        "--data",
        str(data),
        "--batch-size",
        "5",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # rank 0 alone prints
    both = json.loads(lines[0])
    assert both["world_size"] == 2 and both["images"] == single["images"] == 12
    assert (both["top1"], both["top5"]) == (single["top1"], single["top5"])
    assert both["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)


def test_auto_precision_is_the_runs_where_the_device_allows() -> None:
    from train.evaluate import EvalConfig, Weights, eval_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def precision(run_precision, asked="auto", device=cpu):
        found = Weights(Path("w"), "resnet18", None, 3, {}, 1, run_precision, None)
        return eval_precision(EvalConfig(Path("w"), Path("d"), precision=asked), found, device)

    assert precision("bf16") == "bf16"  # a GPU run's bf16 evaluation, repeated on CPU
    assert precision("fp32", device=cuda) == "fp32"  # a CPU run's exact numbers on a GPU
    assert precision("fp16", device=cuda) == "fp16"
    assert precision("fp16") == "auto"  # fp16 needs CUDA: the device's default
    assert precision(None) == "auto"  # a state_dict
    assert precision("bf16", asked="fp32") == "fp32"  # asked for wins

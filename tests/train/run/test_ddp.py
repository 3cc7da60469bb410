"""DDP: 2 gloo processes under torchrun agree with one process on the same global batch.

The model is torchvision's squeezenet1_1 with dropout 0: it has no BatchNorm, whose per-rank
batch statistics would (correctly) differ from one process's statistics over the global batch,
and nothing random in the forward. The stand-in loader gives rank r rows [r*B, (r+1)*B) of the
global batch a single process with batch 2B gets, and one rank an EMPTY validation batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.standin import StandInData
from train.plan.config import RunConfig
from train.run.main import run
from train.run.metrics import read_metrics

REPO = Path(__file__).resolve().parents[3]
RECIPE = {
    "arch": "squeezenet1_1",
    "model_kwargs": {"dropout": 0.0},
    "zero_init_residual": False,
    "label_smoothing": 0.1,
    "weight_decay": 5e-4,
}
NUM_TRAIN, NUM_VAL = 64, 17  # 17 val images, 2 ranks, batch 8: rank 1's 2nd batch is empty


def phases(batch_size: int) -> dict:
    return {
        "recipe": RECIPE,
        "phases": [
            {
                "epochs": [0, 1],
                "prep_size": 160,
                "crop_size": 32,
                "batch_size": batch_size,
                "lr": [0.02, 0.05],
            },
            {
                "epochs": [1, 2],
                "prep_size": 160,
                "crop_size": 40,
                "batch_size": batch_size,
                "lr": [0.05, 0.0],
            },
        ],
    }


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    single_phases, ddp_phases = tmp_path / "single.json", tmp_path / "ddp.json"
    single_phases.write_text(json.dumps(phases(16)))
    ddp_phases.write_text(json.dumps(phases(8)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "train" / "standin.py"),
        "--phases",
        str(ddp_phases),
        "--out",
        str(tmp_path / "ddp"),
        "--num-train",
        str(NUM_TRAIN),
        "--num-val",
        str(NUM_VAL),
    ]
    ddp = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:  # the single-process run overlaps the torchrun start-up
        run(
            RunConfig(
                single_phases,
                out_dir=tmp_path / "single",
                device="cpu",
                log_every=1,
                progress=False,
                tensorboard=False,
            ),
            StandInData(NUM_TRAIN, NUM_VAL),
        )
        output, _ = ddp.communicate(timeout=300)
    finally:
        if ddp.poll() is None:
            ddp.kill()
    assert ddp.returncode == 0, output[-3000:]

    single = torch.load(tmp_path / "single" / "checkpoints" / "final.pt", weights_only=True)
    both = torch.load(tmp_path / "ddp" / "checkpoints" / "final.pt", weights_only=True)
    assert both["world_size"] == 2 and both["global_step"] == single["global_step"] == 8
    for key, value in single["model"].items():
        torch.testing.assert_close(both["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    single_records, ddp_records = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["epoch"] for r in ddp_records] == [0, 1]  # rank 0 alone writes
    for a, b in zip(single_records, ddp_records):
        assert b["global_batch_size"] == a["global_batch_size"] == 16
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["top1"] == pytest.approx(a["top1"], abs=100 / NUM_VAL + 1e-9)  # 1 near-tie
        assert b["top5"] == a["top5"] == 100.0
        assert (
            b["val_images"] == a["val_images"] == NUM_VAL
        )  # every image once, no padded duplicates

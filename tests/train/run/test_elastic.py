"""Elastic resume: a run stopped mid-epoch continues on another world size with the same global
batch, each remaining sample of the epoch seen once (train.run.resume.check_resume_on); and
--global-batch keep on one process trains what the tuned 2-process run trains.

The gloo test runs each rank as a plain process (RANK/WORLD_SIZE/MASTER_* set, as torchrun
sets them) on tests/train/run/elastic_standin.py, 2 ranks -> 1 -> 2, against an uninterrupted
2-rank run. squeezenet1_1 (dropout 0) has no BatchNorm: its weights come out equal to float
tolerance. ResNet-18 has BatchNorm: with batch_size 8 on 2 ranks -> 8 x accum_steps 2 on 1 rank,
every forward still normalizes the same 8 images, so its weights match too, but its running
statistics differ (2 ranks keep rank 0's, which saw half of the micro-batches; 1 rank saw them
all): the checkpointed BN buffers are the one difference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.train.run import elastic_standin
from tests.train.standin import quick_config
from train.errors import TrainError
from train.plan.schedule import Schedule
from train.plan.world_size import plan_world
from train.run.main import run
from train.run.metrics import read_metrics
from train.run.resume import check_resume_on

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tests" / "train" / "run" / "elastic_standin.py"
GLOBAL_BATCH, NUM_TRAIN, NUM_VAL = 16, 64, 17  # 4 optimizer steps an epoch
BN_FREE = {"arch": "squeezenet1_1", "model_kwargs": {"dropout": 0.0}}
WITH_BN = {"arch": "resnet18"}


def phases_file(path: Path, recipe: dict, batch_size: int = 8) -> Path:
    phases = [
        {"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": batch_size},
        {"epochs": [1, 2], "prep_size": 160, "crop_size": 40, "batch_size": batch_size},
    ]
    phases[0]["lr"], phases[1]["lr"] = [0.02, 0.05], [0.05, 0.0]
    common = {"label_smoothing": 0.1, "weight_decay": 5e-4, "zero_init_residual": False}
    path.write_text(json.dumps({"recipe": {**common, **recipe}, "phases": phases}))
    return path


# --- the identity a resume compares (pure) ------------------------------------------------------


def saved_at(world_size: int, schedule: Schedule, step: int = 2) -> dict:
    return {
        "arch": "squeezenet1_1",
        "num_classes": 3,
        "recipe": {"tuned_num_gpus": None},
        "schedule": schedule.to_dicts(),
        "seed": 0,
        "world_size": world_size,
        "precision": "fp32",
        "sync_bn": False,
        "epoch": 0,
        "step": step,
    }


def identity_at(world_size: int, schedule: Schedule) -> dict:
    return {**saved_at(world_size, schedule), "epoch": None, "step": None}


def file_schedule(**phase) -> Schedule:
    keys = {"epochs": [0, 2], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": 0.1}
    return Schedule.from_dicts([{**keys, **phase}])


def test_a_checkpoint_of_2_ranks_resumes_on_1_with_its_global_batch_kept() -> None:
    two = file_schedule()
    planned_at = lambda world: plan_world(two, None, world, None).schedule  # noqa: E731
    identity, changes, moved = check_resume_on(
        saved_at(2, two), Path("last.pt"), identity_at(1, two), planned_at
    )
    assert changes == [] and identity["world_size"] == 2  # what the next checkpoints keep
    assert identity["schedule"] == two.to_dicts()
    assert [(p.batch_size, p.accum_steps) for p in moved.schedule.phases] == [(8, 2)]
    assert moved.lines == (
        "resuming a 2-rank run on 1 rank: batch_size 8 x accum_steps 2 keeps the global batch 16",
    )
    # Back on 2 ranks, that checkpoint (still planned for 2) trains the original split.
    assert check_resume_on(saved_at(2, two), Path("p"), identity_at(2, two), planned_at)[2] is None


def test_an_elastic_resume_still_refuses_a_changed_schedule_or_an_impossible_split() -> None:
    two, changed = file_schedule(), file_schedule(lr=0.2)
    planned_at = lambda world: plan_world(changed, None, world, None).schedule  # noqa: E731
    with pytest.raises(TrainError, match=r"^last.pt: changed since .*lr \[0.1, 0.1\] -> \[0.2"):
        check_resume_on(saved_at(2, two), Path("last.pt"), identity_at(1, changed), planned_at)
    _, changes, moved = check_resume_on(
        saved_at(2, two), Path("last.pt"), identity_at(1, changed), planned_at, allow_changed=True
    )
    assert len(changes) == 1 and moved.schedule.phases[0].lr == (0.2, 0.2)
    planned_at = lambda world: plan_world(two, None, world, None).schedule  # noqa: E731
    with pytest.raises(TrainError, match="^last.pt: resuming a 2-rank run on 3 ranks: .*: 2 or 4$"):
        check_resume_on(saved_at(2, two), Path("last.pt"), identity_at(3, two), planned_at)


def test_global_batch_keep_and_scale_on_one_process(tmp_path: Path, capsys) -> None:
    """A 2-GPU recipe on 1 process: keep trains batch_size 8 x accum_steps 2 and says so; scale
    halves the LR; without tuned_num_gpus either is one line."""
    tuned = {**BN_FREE, "tuned_num_gpus": 2}
    phases = phases_file(tmp_path / "phases.json", tuned)
    threads = torch.get_num_threads()
    try:
        for mode in ("keep", "scale"):
            elastic_standin.main(
                ["--phases", str(phases), "--out", str(tmp_path / mode), "--global-batch", mode]
            )
    finally:  # the runs set one thread
        torch.set_num_threads(threads)
    out = capsys.readouterr().err
    assert "global batch 16 kept on 1 GPU: batch_size 8 x accum_steps 2 (tuned for 2 GPUs:" in out
    assert "per-GPU batch kept on 1 GPU: global batch 8 instead of 16, every LR x 1/2" in out
    final = torch.load(tmp_path / "keep" / "checkpoints" / "final.pt", weights_only=True)
    assert [(p["batch_size"], p["accum_steps"]) for p in final["schedule"]] == [(8, 2), (8, 2)]
    assert "global batch 16 kept on 1 GPU" in (tmp_path / "keep" / "event.log").read_text()
    keep, scale = read_metrics(tmp_path / "keep"), read_metrics(tmp_path / "scale")
    assert [r["global_batch_size"] for r in keep] == [16, 16]
    assert [r["global_batch_size"] for r in scale] == [8, 8]
    assert [r["accum_steps"] for r in scale] == [1, 1]
    config = json.loads((tmp_path / "scale" / "config.json").read_text())
    assert [p["lr"] for p in config["schedule"]] == [[0.01, 0.025], [0.025, 0.0]]
    phases_file(phases, BN_FREE)
    with pytest.raises(TrainError, match="^--global-batch keep: the recipe has no tuned_num_gpus"):
        elastic_standin.main(
            ["--phases", str(phases), "--out", str(tmp_path / "no"), "--global-batch", "keep"]
        )


def test_the_dry_run_plans_for_the_launchers_world_size(tmp_path: Path, capsys, monkeypatch):
    phases = phases_file(tmp_path / "phases.json", {**BN_FREE, "tuned_num_gpus": 2})
    config = quick_config(phases_path=phases, dry_run=True, global_batch="keep")
    run(config)
    out = capsys.readouterr().out
    assert "global batch 16 kept on 1 GPU: batch_size 8 x accum_steps 2 (tuned for 2" in out
    assert sum(" 8x2 " in line for line in out.splitlines()) == 2  # both epochs' table rows
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node=4 sets it
    run(config)
    assert "global batch 16 kept on 4 GPUs: batch_size 4 x accum_steps 1" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(TrainError, match="over 3 ranks; nearest world sizes that keep it: 2 or 4$"):
        run(config)


# --- gloo: 2 ranks -> 1 -> 2 against an uninterrupted run -----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, *args) -> list[subprocess.Popen]:
    """`world_size` ranks of elastic_standin.py, as torchrun would start them."""
    port, processes = free_port(), []
    for rank in range(world_size):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        if world_size > 1:
            env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(world_size),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world_size),
            )
        command = [sys.executable, str(SCRIPT), *map(str, args)]
        processes.append(
            subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    return processes


def finish(processes: list[subprocess.Popen], code: int) -> str:
    """Every rank's output; each rank must exit with `code` (130: stopped, checkpointed)."""
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=300)
            outputs.append(output.decode())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == code, output[-3000:]
    return "\n".join(outputs)


def steps_seen(record_dir: Path) -> dict[tuple[int, int], list[int]]:
    """(epoch, optimizer step) -> the record indices it consumed, summed over ranks: step s
    with accumulation A takes micro-batches s * A .. s * A + A - 1 of every rank."""
    steps = defaultdict(list)
    for path in record_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            batch = json.loads(line)
            accum = GLOBAL_BATCH // (batch["batch_size"] * batch["world_size"])
            steps[batch["epoch"], batch["batch"] // accum] += batch["indices"]
    return {key: sorted(indices) for key, indices in steps.items()}


def final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [BN_FREE, WITH_BN], ids=["bn-free", "batchnorm"])
def test_gloo_2_ranks_then_1_then_2_match_an_uninterrupted_run(tmp_path: Path, recipe) -> None:
    phases = phases_file(tmp_path / "phases.json", recipe)
    records = {name: tmp_path / "records" / name for name in ("reference", "elastic")}
    for directory in records.values():
        directory.mkdir(parents=True)
    common = ["--phases", phases, "--num-train", NUM_TRAIN, "--num-val", NUM_VAL]
    reference = launch(
        2, *common, "--out", tmp_path / "reference", "--record", records["reference"]
    )
    elastic = ["--out", tmp_path / "elastic", "--record", records["elastic"], *common]
    try:  # 2 ranks stop after epoch 0 step 1 (2 micro-batches of rank 0)
        output = finish(launch(2, *elastic, "--stop-after", 2), 130)
    finally:
        finish(reference, 0)
    assert "stopped at epoch 0 step 2" in output
    # 1 rank: 8 x accum 2; steps 2-3 of epoch 0 and step 0 of epoch 1, then a stop
    output = finish(launch(1, *elastic, "--resume", "auto", "--stop-after", 6), 130)
    assert "resuming a 2-rank run on 1 rank: batch_size 8 x accum_steps 2 keeps the global " in (
        output
    )
    assert "stopped at epoch 1 step 1" in output
    output = finish(launch(2, *elastic, "--resume", "auto"), 0)  # back on 2 ranks, to the end
    assert "resuming" not in output  # the checkpoint is still planned for 2 ranks

    seen, expected = steps_seen(records["elastic"]), steps_seen(records["reference"])
    assert sorted(seen) == [(e, s) for e in (0, 1) for s in range(4)]
    assert seen == expected  # the same samples in every step, none redone or skipped
    for epoch in (0, 1):
        epoch_indices = sum((seen[epoch, s] for s in range(4)), [])
        assert sorted(epoch_indices) == list(range(NUM_TRAIN))  # each sample once an epoch

    ref, got = final(tmp_path / "reference"), final(tmp_path / "elastic")
    assert got["world_size"] == 2 and got["schedule"] == ref["schedule"]
    assert (got["epoch"], got["step"], got["global_step"]) == (2, 0, 8)
    buffers = {k for k in ref["model"] if "running_" in k or "num_batches_tracked" in k}
    for key, value in ref["model"].items():
        if key not in buffers:
            torch.testing.assert_close(got["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    if recipe is WITH_BN:  # the one difference: which micro-batches updated the running stats
        assert any(
            not torch.allclose(got["model"][k].float(), ref["model"][k].float(), atol=1e-4)
            for k in buffers
            if "running_" in k
        )
    else:
        assert not buffers
    for a, b in zip(read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "elastic")):
        assert b["global_batch_size"] == a["global_batch_size"] == GLOBAL_BATCH
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)

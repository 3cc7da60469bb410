"""`train run` refuses at start, in one line, what would otherwise fail (or train silently on
the wrong data) later: out-of-range options, damaged or misplaced shard directories, a global
batch larger than the data, a model the recipe cannot build or run at its crops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from formats.record import RECORDS_FILE
from train.cli import app
from train.plan.config import WORKERS_PER_CORE, RunConfig, cap_workers
from train.plan.schedule import Schedule
from train.run.shard_checks import ShardInfo, check_global_batches, check_shard_info

PHASE = {"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 4, "lr": [0.1, 0.0]}


def write_phases(tmp_path: Path, phases=(PHASE,), recipe=None) -> Path:
    path = tmp_path / "phases.json"
    path.write_text(json.dumps({"recipe": recipe or {"arch": "resnet18"}, "phases": list(phases)}))
    return path


def error_line(*args) -> str:
    result = CliRunner().invoke(app, ["run", *map(str, args)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("train: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--seed", str(2**32)], "--seed must be <= 4294967295"),
        (["--full-prep-size", "0"], "--full-prep-size must be a positive integer"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--eval-every", "0"], "recipe key 'eval_every': must be a positive integer, got 0"),
        (["--checkpoint-every-steps", "-1"], "--checkpoint-every-steps must be >= 0"),
        (["--workers", "-3"], "--workers must be >= 0"),
        (["--precision", "fp8"], "--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        (["--target", "top1=nan"], "--target top1=nan: must be a percentage in (0, 100]"),
        (["--target", "top5=101"], "--target top5=101: must be a percentage"),
        (["--overwrite", "--resume", "auto"], "--overwrite and --resume auto contradict"),
    ],
)
def test_out_of_range_options_are_one_line(tmp_path: Path, option, expected) -> None:
    line = error_line("--phases", write_phases(tmp_path), "--dry-run", *option)
    assert expected in line


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup", "-1"], "--warmup >= 0, got 30 and -1"),
        (["--workers", "-3"], "--workers must be >= 0"),
        (["--precision", "fp8"], "--precision must be"),
    ],
)
def test_bench_options_out_of_range_are_one_line(tmp_path: Path, option, expected) -> None:
    result = CliRunner().invoke(
        app, ["bench", "--phases", str(write_phases(tmp_path)), "--device", "cpu", *option]
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("train: error: ") and expected in lines[0], lines[0]


def test_workers_and_threads_are_capped_with_a_warning() -> None:
    config = RunConfig(Path("p.json"), workers=1000, threads=3)
    capped, warnings = cap_workers(config, num_cpus=2)
    assert (capped.workers, capped.threads) == (2 * WORKERS_PER_CORE, 3)
    assert warnings == [
        f"train: warning: --workers 1000 is more than {WORKERS_PER_CORE} per "
        "core (2 cores, 1 process(es) per node): using 8"
    ]
    # Eight ranks on one 16-core node share its cores.
    capped, _ = cap_workers(RunConfig(Path("p.json"), workers=20), num_cpus=16, procs_per_node=8)
    assert capped.workers == 8
    assert cap_workers(RunConfig(Path("p.json"), workers=8), num_cpus=2) == (
        RunConfig(Path("p.json"), workers=8),
        [],
    )


def test_absurd_workers_warn_on_the_command_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["run", "--phases", str(write_phases(tmp_path)), "--dry-run", "--workers", "100000"]
    )
    assert result.exit_code == 0, result.stderr
    assert "train: warning: --workers 100000 is more than" in result.stderr


def test_shard_info_must_match_the_directory_name() -> None:
    info = ShardInfo(["a", "b"], "val", 160, 10)
    with pytest.raises(Exception, match=r"train-160/ holds a 'val' dataset .* not 'train'"):
        check_shard_info(info, "train-160", "train", 160)
    with pytest.raises(Exception, match=r"val-128/ holds images of prep_size 160 .* not 128"):
        check_shard_info(info, "val-128", "val", 128)
    check_shard_info(info, "val-160", "val", 160)  # as named: no error


def test_global_batch_must_fit_the_training_set() -> None:
    schedule = Schedule.from_dicts([dict(PHASE, batch_size=4, accum_steps=2)])
    check_global_batches(schedule, {"train-160": 16}, world_size=2)  # 4 x 2 x 2 = 16 fits
    with pytest.raises(
        Exception,
        match=r"phase 0: global batch 32 \(batch_size 4 x 4 rank\(s\) "
        r"x accum_steps 2\) is larger than train-160/'s 16",
    ):
        check_global_batches(schedule, {"train-160": 16}, world_size=4)


@pytest.fixture
def shards(built_shards, tmp_path: Path) -> Path:
    """A private copy of the session's LMDB train-160/val-160, to damage or rearrange."""
    root = tmp_path / "shards"
    for split in ("train", "val"):
        shutil.copytree(built_shards / "lmdb" / f"{split}-160", root / f"{split}-160")
    return root


def test_label_outside_the_classes_is_refused(shards: Path, tmp_path: Path) -> None:
    path = shards / "train-160" / RECORDS_FILE
    records = np.load(path)
    records["label"][5] = 7  # 3 classes
    np.save(path, records)
    line = error_line(
        "--phases", write_phases(tmp_path), "--data", shards, "--out", tmp_path / "run"
    )
    assert "records.npy: record 5 has label 7, outside [0, 3)" in line
    assert not (tmp_path / "run").exists()


def test_val_data_placed_as_train_is_refused(shards: Path, tmp_path: Path) -> None:
    shutil.rmtree(shards / "train-160")
    shutil.copytree(shards / "val-160", shards / "train-160")
    line = error_line("--phases", write_phases(tmp_path), "--data", shards, "--dry-run")
    assert "train-160/ holds a 'val' dataset" in line


def test_data_of_another_prep_size_is_refused(shards: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        (shards / f"{split}-160").rename(shards / f"{split}-128")
    phases = write_phases(tmp_path, [dict(PHASE, prep_size=128)])
    line = error_line("--phases", phases, "--data", shards, "--dry-run")
    assert "train-128/ holds images of prep_size 160" in line


def test_global_batch_larger_than_the_data_is_refused(shards: Path, tmp_path: Path) -> None:
    phases = write_phases(tmp_path, [dict(PHASE, batch_size=64)])
    line = error_line("--phases", phases, "--data", shards, "--out", tmp_path / "run")
    assert "global batch 64" in line and "train-160/'s 18 images" in line


def test_data_pointing_at_one_dataset_is_refused(shards: Path, tmp_path: Path) -> None:
    line = error_line(
        "--phases", write_phases(tmp_path), "--data", shards / "train-160", "--dry-run"
    )
    assert f"--data {shards / 'train-160'} is itself a dataset directory" in line
    assert f"--data {shards}" in line


def test_missing_val_shards_are_one_line(shards: Path, tmp_path: Path) -> None:
    shutil.rmtree(shards / "val-160")
    line = error_line(
        "--phases", write_phases(tmp_path), "--data", shards, "--out", tmp_path / "run"
    )
    assert "phase 0 needs val shards val-160/" in line


@pytest.mark.parametrize(
    ("recipe", "phase", "expected"),
    [
        (
            {"arch": "resnet18", "model_kwargs": {"no_such_arg": 1}},
            PHASE,
            "cannot build resnet18 with model_kwargs {'no_such_arg': 1} (TypeError: ",
        ),
        (
            {"arch": "resnet18", "model_kwargs": {"width_per_group": "wide"}},
            PHASE,
            "cannot build resnet18 with model_kwargs {'width_per_group': 'wide'}",
        ),
        (
            {"arch": "resnet18", "model_kwargs": {"num_classes": 10}},
            PHASE,
            "multiple values for keyword argument 'num_classes'",
        ),
        (
            {"arch": "vit_b_16"},
            PHASE,
            "vit_b_16 cannot take 32 px crops (AssertionError: Wrong image height!",
        ),
        (
            {"arch": "inception_v3", "model_kwargs": {"init_weights": False}},
            dict(PHASE, prep_size=320, crop_size=299),
            "inception_v3 returns InceptionOutputs in training mode",
        ),
    ],
)
def test_recipe_models_that_would_fail_later_are_refused(
    tmp_path: Path, recipe, phase, expected
) -> None:
    line = error_line("--phases", write_phases(tmp_path, [phase], recipe), "--dry-run")
    assert str(tmp_path / "phases.json") in line and expected in line


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ({"nesterov": True, "momentum": 0}, "recipe key 'nesterov': needs a momentum above 0"),
        ({"targets": {"top1": 750}}, "recipe key 'targets': must be an object of percentages"),
    ],
)
def test_recipe_values_that_would_fail_later_are_refused(tmp_path: Path, recipe, expected) -> None:
    phases = write_phases(tmp_path, recipe={"arch": "resnet18", **recipe})
    assert expected in error_line("--phases", phases, "--dry-run")


def test_phases_that_are_not_json_or_of_wrong_types_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    for text, expected in (
        ('{"recipe": ', "invalid JSON"),
        (json.dumps([dict(PHASE, epochs=[0, "2"])]), "key 'epochs'"),
        (json.dumps([dict(PHASE, batch_size=2.5)]), "key 'batch_size'"),
        (json.dumps([dict(PHASE, epochs=[0, 10**8])]), "at most 100,000"),
        ('{"phases": 3}', "bad.json"),
    ):
        path.write_text(text)
        assert expected in error_line("--phases", path, "--dry-run")

"""The run directory: one `train run` per --out (a kernel-released lock), no fresh start over an
old run's outputs without --overwrite, no resume that silently changes what the run computes."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.train.standin import StandInData, quick_config
from train.cli import app
from train.errors import CheckpointError, TrainError
from train.plan.config import RunConfig
from train.run.main import run
from train.run.metrics import read_metrics
from train.run.resume import changes_since, resume_path
from train.run.run_dir import LOCK_NAME, acquire, clear_outputs, release, run_outputs

REPO = Path(__file__).resolve().parents[3]
STANDIN = REPO / "tests" / "train" / "standin.py"
RECIPE = {"arch": "resnet18", "weight_decay": 5e-5}
PHASES = [
    {"epochs": [0, 2], "prep_size": 160, "crop_size": 32, "batch_size": 12, "lr": [0.05, 0.0]}
]  # 48 stand-in images: 4 steps an epoch


def write_phases(path: Path, recipe=RECIPE, phases=PHASES) -> Path:
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
def stopped_run(tmp_path_factory) -> Path:
    """A run with its checkpoint after epoch 0 of 2 (as if stopped there): copy before use."""
    tmp_path = tmp_path_factory.mktemp("stopped")
    run(config(tmp_path), StandInData())
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    saved["epoch"], saved["global_step"] = 1, 4  # the end of epoch 0 (weights do not matter)
    torch.save(saved, last)
    (tmp_path / "run" / "checkpoints" / "final.pt").unlink()
    return tmp_path / "run"


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run"))


# --- the lock ----------------------------------------------------------------------------


def hold_lock(out: Path, pid: int = 4242) -> int:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
    return fd


def test_a_second_run_on_a_locked_out_refuses_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fd = hold_lock(out)
    try:
        with pytest.raises(
            TrainError,
            match=rf"{out} is in use by PID 4242, a train run .*"
            r"choose another --out",
        ):
            run(config(tmp_path), StandInData())
        assert run_outputs(out) == []  # nothing written by the refused run
    finally:
        os.close(fd)
    run(config(tmp_path), StandInData())  # released: runs
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


def test_forked_workers_do_not_keep_the_lock(tmp_path: Path) -> None:
    """A loader worker forked while the lock is held closes its copy, so the lock dies with
    the run's process, not with the last of its workers."""
    out = tmp_path / "run"
    fd = acquire(out)
    try:
        child = os.fork()
        if child == 0:  # the worker: exit 0 only if it holds no descriptor of the lock
            try:
                os.fstat(fd)
                os._exit(1)
            except OSError:
                os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
    finally:
        release(fd)
    probe = os.open(out / LOCK_NAME, os.O_RDWR)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: free again
    os.close(probe)


@pytest.mark.slow
def test_concurrent_runs_one_refuses_and_a_killed_holder_frees_the_lock(tmp_path: Path) -> None:
    """Through real processes: the lock is held while the first run trains, and the kernel
    drops it when that process is killed with SIGKILL (no stale-lock cleanup needed)."""
    phases = write_phases(tmp_path / "phases.json")
    args = [
        sys.executable,
        str(STANDIN),
        "--phases",
        str(phases),
        "--out",
        str(tmp_path / "run"),
        "--threads",
        "1",
    ]
    # slow enough per batch that it is still training (and holding the lock) however long the
    # second run takes to start on a loaded machine; it is killed below, never waited for
    first = subprocess.Popen([*args, "--delay", "5"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "config.json").exists():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"is in use by PID {first.pid}" in second.stderr
    finally:
        first.kill()
        first.communicate()
    resumed = subprocess.run(
        [*args, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_torchrun_ranks_fail_together_when_the_lock_is_held(built_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fd = hold_lock(out)
    phases = write_phases(tmp_path / "phases.json", phases=[dict(PHASES[0], batch_size=4)])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        "run",
        "--phases",
        str(phases),
        "--data",
        str(built_shards / "lmdb"),
        "--out",
        str(out),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-tensorboard",
        "--threads",
        "1",
    ]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    finally:
        os.close(fd)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    refusals = [line for line in output.splitlines() if "is in use by PID 4242" in line]
    assert len(refusals) == 2, output  # one line from each rank, none left waiting
    assert all(line.startswith("train: error: ") for line in refusals), refusals
    assert str(REPO / "train") not in output  # no traceback of ours (torchrun prints its own)


# --- fresh start, --overwrite, --resume auto ------------------------------------------------


def test_resume_path_rules(stopped_run: Path, tmp_path: Path) -> None:
    out = copy_of(stopped_run, tmp_path)
    last = out / "checkpoints" / "last.pt"
    with pytest.raises(
        CheckpointError,
        match=r"already holds a run \(config.json, "
        r"metrics.jsonl, event.log, checkpoints/\); pass "
        r"--resume auto to continue it, --overwrite",
    ):
        resume_path(out, None)
    assert resume_path(out, "auto") == last
    assert resume_path(out, None, overwrite=True) is None
    with pytest.raises(CheckpointError, match="inside .* which --overwrite would clear"):
        resume_path(out, str(out), overwrite=True)
    other = copy_of(stopped_run, tmp_path / "other")
    with pytest.raises(CheckpointError, match="already holds another run"):
        resume_path(out, str(other))
    assert resume_path(tmp_path / "new", str(last)) == last  # into an empty --out
    assert resume_path(tmp_path / "new", "auto") is None


@pytest.mark.parametrize("left", [[], ["last.pt.tmp"]])
def test_deleted_checkpoint_is_never_a_silent_fresh_start(
    stopped_run: Path, tmp_path: Path, left
) -> None:
    out = copy_of(stopped_run, tmp_path)
    for path in (out / "checkpoints").iterdir():
        path.unlink()
    for name in left:  # SIGKILL during a save leaves only the temp file
        (out / "checkpoints" / name).write_bytes(b"partial")
    before = {name: (out / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(CheckpointError, match=r"already holds a run .* pass --overwrite"):
        run(config(tmp_path), StandInData())
    with pytest.raises(
        CheckpointError,
        match=r"no .*last.pt to resume, but the run there got "
        r"as far as metrics.jsonl.* --overwrite",
    ):
        run(config(tmp_path, resume="auto"), StandInData())
    assert {name: (out / name).read_bytes() for name in before} == before  # untouched


def test_overwrite_clears_the_old_outputs_only(stopped_run: Path, tmp_path: Path) -> None:
    out = copy_of(stopped_run, tmp_path)
    (out / "config.resume-1.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    run(config(tmp_path, overwrite=True), StandInData())
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]  # one epoch 0, not two
    assert not (out / "config.resume-1.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["resumed_from"] is None


def test_resume_auto_before_any_save_starts_clean(tmp_path: Path) -> None:
    """A run stopped before its first checkpoint trained nothing that could be kept."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "event.log").write_text("old\n")
    run(config(tmp_path, resume="auto"), StandInData())
    assert '"old": true' not in (out / "config.json").read_text()  # ("bce_target_thresh-old")
    assert not (out / "event.log").read_text().startswith("old")


def test_clear_outputs_lists_and_removes_run_files(tmp_path: Path) -> None:
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events").write_text("x")
    (tmp_path / "checkpoints").mkdir()  # empty: not an output
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / LOCK_NAME).write_text("1\n")
    assert clear_outputs(tmp_path) == ["metrics.jsonl", "tb/"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


# --- a resume that changes the run ------------------------------------------------------------


def saved_identity(**changes) -> tuple[dict, dict]:
    recipe = {
        "arch": "resnet18",
        "weight_decay": 5e-5,
        "label_smoothing": 0.0,
        "targets": {"top1": 70.0},
    }
    saved = {"recipe": recipe, "schedule": [dict(PHASES[0])], "seed": 0, "precision": "fp32"}
    new = json.loads(json.dumps(saved))
    for key, value in changes.items():
        target = new["recipe"] if key in recipe else new
        target[key] = value
    new["sync_bn"] = False  # an older checkpoint did not record it: not compared
    return saved, new


def test_changes_since_lists_what_affects_results() -> None:
    saved, new = saved_identity(
        weight_decay=1e-4, label_smoothing=0.1, seed=3, targets={"top1": 75.0}
    )
    new["schedule"][0]["lr"] = [0.1, 0.0]
    assert changes_since(saved, new) == [
        "label_smoothing 0.0 -> 0.1",
        "weight_decay 5e-05 -> 0.0001",
        "schedule (phase 0: lr [0.05, 0.0] -> [0.1, 0.0])",
        "seed 0 -> 3",
    ]
    assert changes_since(*saved_identity(targets={"top5": 90.0})) == []  # reporting only


def test_changed_recipe_on_resume_is_refused_unless_allowed(
    stopped_run: Path, tmp_path: Path
) -> None:
    out = copy_of(stopped_run, tmp_path)
    changed = write_phases(
        tmp_path / "changed.json", dict(RECIPE, weight_decay=1e-3, label_smoothing=0.1)
    )
    args = dict(phases_path=changed, resume="auto", seed=7)
    with pytest.raises(
        TrainError,
        match=r"last.pt: changed since this checkpoint: "
        r"label_smoothing 0.0 -> 0.1; weight_decay 5e-05 -> "
        r"0.001; seed 0 -> 7; .*--allow-changed",
    ):
        run(config(tmp_path, **args), StandInData())
    assert not (out / "config.resume-1.json").exists()
    run(config(tmp_path, allow_changed=True, **args), StandInData())
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]
    noted = json.loads((out / "config.json").read_text())["changed_on_resume"]
    assert noted == [
        {
            "epoch": 1,
            "step": 0,
            "config": "config.resume-1.json",
            "changes": ["label_smoothing 0.0 -> 0.1", "weight_decay 5e-05 -> 0.001", "seed 0 -> 7"],
        }
    ]
    resume_config = json.loads((out / "config.resume-1.json").read_text())
    assert resume_config["args"]["allow_changed"] is True
    assert "--allow-changed: label_smoothing" in (out / "event.log").read_text()


def test_checkpoint_of_another_model_is_one_line(stopped_run: Path, tmp_path: Path) -> None:
    copy_of(stopped_run, tmp_path)
    with pytest.raises(
        TrainError, match="holds resnet18 with 3 classes, this run builds resnet34 with 3"
    ):
        run(
            config(tmp_path, resume="auto", recipe={"arch": "resnet34"}, allow_changed=True),
            StandInData(),
        )
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    saved["model"]["fc.weight"] = torch.zeros(3, 256)  # a narrower variant of the same arch
    torch.save(saved, last)
    with pytest.raises(
        TrainError,
        match=r"last.pt: the checkpoint's weights do not fit this "
        r"run's model \(RuntimeError: Error\(s\) in loading",
    ):
        run(config(tmp_path, resume="auto"), StandInData())


def test_resume_refusals_are_one_line_at_the_cli(
    stopped_run: Path, built_shards, tmp_path: Path
) -> None:
    """The same refusal, through `train run` (the stand-in's run has 3 classes, as the shards)."""
    out = copy_of(stopped_run, tmp_path)
    phases = write_phases(tmp_path / "phases.json", dict(RECIPE, weight_decay=0.01))
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--phases",
            str(phases),
            "--data",
            str(built_shards / "lmdb"),
            "--out",
            str(out),
            "--resume",
            "auto",
            "--workers",
            "0",
            "--no-progress",
            "--no-tensorboard",
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"train: error: {out}/checkpoints/last.pt: changed since this checkpoint: weight_decay "
        "5e-05 -> 0.01; resume with the settings the run started with, or pass "
        "--allow-changed to continue with these (recorded in config.json)"
    ]


def test_damaged_checkpoint_fields_are_one_line(stopped_run: Path, tmp_path: Path) -> None:
    last = copy_of(stopped_run, tmp_path) / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    torch.save({k: v for k, v in saved.items() if k not in ("rng", "recipe")}, last)
    with pytest.raises(
        CheckpointError,
        match=r"last.pt: a damaged shardtrain checkpoint "
        r"\(missing recipe, rng\)",
    ):
        run(config(tmp_path, resume="auto"), StandInData())
    torch.save({**saved, "rng": {"torch": 3, "python": [1]}}, last)
    with pytest.raises(TrainError, match=r"last.pt: damaged RNG or epoch-sum state"):
        run(config(tmp_path, resume="auto"), StandInData())


class RunsCode:
    """Unpickling this would run a command (what weights_only=True exists to refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_is_not_plain_data_is_one_line_without_bad_advice(tmp_path: Path) -> None:
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    for content, reason in (
        (RunsCode(marker), "unsupported GLOBAL posix.system"),
        (None, "Unsupported operand"),
    ):
        if content is None:
            last.write_bytes(b"not a checkpoint\n")
        else:
            torch.save({"model": content}, last)
        with pytest.raises(CheckpointError) as raised:
            run(config(tmp_path, resume="auto"), StandInData())
        message = str(raised.value)
        assert (
            message.startswith(f"{last}: not a checkpoint of tensors and plain data, not loaded (")
            and reason in message
        ), message
        assert "weights_only" not in message and "\n" not in message  # torch's advice: not ours
    assert not marker.exists()

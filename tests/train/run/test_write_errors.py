"""`train export --out` where it cannot write, and a checkpoint write cut short: one line each,
in the OS's own words, nothing half-written."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import formats
from tests.train.run.test_disk_errors import one_error_line
from tests.train.run.test_run_dir import config
from tests.train.standin import StandInData
from train.cli import app
from train.run.main import run

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("export")
    run(config(tmp_path), StandInData())
    return tmp_path / "run"


def export(run_dir: Path, out: Path):
    return CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out)])


def test_export_onto_a_directory_is_one_line(finished_run: Path, tmp_path: Path) -> None:
    line = one_error_line(export(finished_run, tmp_path))
    assert line == f"train: error: --out {tmp_path} is a directory; name the .pt file to write"


def test_export_onto_a_read_only_mount_is_one_line(
    finished_run: Path, tmp_path: Path, monkeypatch
) -> None:
    def read_only_open(name, *args, **kwargs):  # as a read-only mount answers (root ignores modes)
        raise OSError(errno.EROFS, "Read-only file system", str(name))

    monkeypatch.setattr(formats, "open", read_only_open, raising=False)  # write_atomic's open
    out = tmp_path / "model.pt"
    line = one_error_line(export(finished_run, out))
    assert line.startswith(f"train: error: cannot write {out} (Read-only file system")


def test_export_onto_a_full_disk_is_one_line(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    out.with_name("model.pt.tmp").symlink_to("/dev/full")  # the kernel's real ENOSPC
    line = one_error_line(export(finished_run, out))
    assert line == f"train: error: cannot write {out} (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


SHORT_WRITE = """
import resource, signal, sys, torch
from pathlib import Path
from train.run import checkpoint as ckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # writes past it come up short
ckpt.save_run({"w": torch.zeros(100_000)}, Path(sys.argv[1]), final=False)
"""


def test_a_checkpoint_write_cut_short_names_the_os_error(tmp_path: Path) -> None:
    # A full disk acts the same (checked on a 512 KiB tmpfs: "No space left on device"); torch's
    # zip writer used to report both as "enforce fail ... unexpected pos".
    done = subprocess.run(
        [sys.executable, "-c", SHORT_WRITE, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    last_line = done.stderr.strip().splitlines()[-1]
    assert f"cannot save a checkpoint in {tmp_path / 'checkpoints'} (File too large)" in last_line
    assert list((tmp_path / "checkpoints").iterdir()) == []

"""Out-of-range options and hostile disks: one line on stderr and a non-zero exit, checked
before anything starts; absurd --workers is capped with a warning."""

from __future__ import annotations

import errno

import pytest
from typer.testing import CliRunner

from formats.manifest import read_manifest
from prep.build import MAX_WORKERS_PER_CORE, default_workers
from prep.cli import app


def _cli(args):
    return CliRunner().invoke(app, args)


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("prep: error: "), (
        result.stderr
    )
    return lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "-3"], "--workers -3: must be >= 0"),
        (["--commit-every", "0"], "--commit-every 0: must be >= 1"),
        (["--commit-every", "-5"], "--commit-every -5: must be >= 1"),
        (["--shard-mb", "0"], "--shard-mb 0: must be >= 1"),
        (["--size", "0"], "each 8..65500 px"),
        (["--size", "70000"], "each 8..65500 px"),
    ],
)
def test_out_of_range_options_are_one_line(sample_src, tmp_path, extra, message):
    src, _ = sample_src
    args = ["build-msgpack", "--src", str(src), "--out", str(tmp_path), "--split", "val", "-q"]
    args += extra if "--size" in extra else ["--size", "64", *extra]
    assert message in _one_error_line(_cli(args))
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_verify_workers_out_of_range(built_shards):
    line = _one_error_line(
        _cli(["verify", str(built_shards / "lmdb" / "val-160"), "--workers", "-1", "-q"])
    )
    assert "--workers -1: must be >= 0" in line


def test_absurd_workers_are_capped_with_a_warning(sample_src, tmp_path):
    src, _ = sample_src
    cap = MAX_WORKERS_PER_CORE * default_workers()
    result = _cli(
        [
            "build-lmdb",
            "--src",
            str(src),
            "--out",
            str(tmp_path),
            "--split",
            "val",
            "--size",
            "64",
            "--workers",
            "1000",
            "-q",
        ]
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        f"prep: warning: --workers 1000 is more than {MAX_WORKERS_PER_CORE} per core "
        f"({default_workers()} cores here): starting {cap}"
    ]
    assert f"with {cap} workers" in result.stdout


def test_read_only_out_is_one_line(sample_src, tmp_path, read_only_dir):
    src, _ = sample_src
    out = tmp_path / "ro"
    out.mkdir()
    read_only_dir(out)
    line = _one_error_line(
        _cli(
            [
                "build-lmdb",
                "--src",
                str(src),
                "--out",
                str(out),
                "--size",
                "64",
                "--split",
                "val",
                "--workers",
                "0",
                "-q",
            ]
        )
    )
    assert "Read-only file system" in line and str(out) in line


def test_full_disk_while_finishing_is_one_line_and_resumable(sample_src, tmp_path, monkeypatch):
    import prep.partial

    src, _ = sample_src
    real_write_manifest = prep.partial.write_manifest

    def disk_full(directory, manifest):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "manifest.json"))

    monkeypatch.setattr(prep.partial, "write_manifest", disk_full)
    args = [
        "build-msgpack",
        "--src",
        str(src),
        "--out",
        str(tmp_path),
        "--size",
        "64",
        "--split",
        "val",
        "--workers",
        "0",
        "-q",
    ]
    line = _one_error_line(_cli(args))
    assert "No space left on device" in line and "rerun the same command to resume" in line
    assert not (tmp_path / "val-64").exists()
    monkeypatch.setattr(prep.partial, "write_manifest", real_write_manifest)
    assert _cli(args).exit_code == 0 and read_manifest(tmp_path / "val-64").count == 12

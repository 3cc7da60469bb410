"""prep build: records equal the source, quirks survive, bad members are listed, finished output is
never rebuilt by accident, and a build killed at any moment resumes to identical output."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from formats.manifest import load_names, load_records, read_manifest
from formats.record import checksum
from formats.store import open_reader
from prep.build import BuildConfig, build
from prep.cli import app
from prep.partial import BuildError
from prep.resize import prepare_image
from prep.sample import write_sample
from prep.sources import open_source
from tests.conftest import jpeg_bytes, wait_for_progress, write_train_tar

PREP = [sys.executable, "-m", "prep.cli"]


def dataset_bytes(dataset_dir: Path) -> list[bytes]:
    manifest = read_manifest(dataset_dir)
    reader = open_reader(dataset_dir, manifest)
    return [bytes(reader.view(i)) for i in range(manifest.count)]


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_records_are_the_source_prepared_once(sample_src, built_shards, store):
    src, info = sample_src
    dataset = built_shards / store / "train-160"
    manifest = read_manifest(dataset)
    records, names = load_records(dataset, manifest), load_names(dataset, manifest)
    members = [(m.name, m.label, m.read()) for m in open_source(src, "train").members()]
    assert names == [name for name, _, _ in members]
    assert records["label"].tolist() == [label for _, label, _ in members]
    stored = dataset_bytes(dataset)
    for (name, _, data), row, jpeg in zip(members, records, stored):
        prepared = prepare_image(data, (160,), 90)
        assert jpeg == prepared.outputs[0].jpeg, name
        assert (row["height"], row["width"]) == (
            prepared.outputs[0].height,
            prepared.outputs[0].width,
        )
        assert (row["orig_height"], row["orig_width"]) == (
            prepared.orig_height,
            prepared.orig_width,
        )
        assert row["crc32"] == checksum(jpeg)
        image = Image.open(io.BytesIO(jpeg))
        assert image.mode == "RGB" and min(image.size) == min(
            160, prepared.orig_height, prepared.orig_width
        )
    quirks = {info.gray_train_name, info.cmyk_train_name, info.png_train_name}
    assert quirks <= set(names) and manifest.rejects == []


def test_both_stores_hold_the_same_records(built_shards):
    for split in ("train", "val"):
        assert dataset_bytes(built_shards / "lmdb" / f"{split}-160") == dataset_bytes(
            built_shards / "msgpack" / f"{split}-160"
        )


def test_several_sizes_in_one_pass(sample_src, tmp_path):
    src, _ = sample_src
    summary = build(BuildConfig(src, tmp_path, "val", (160, 96), "msgpack", workers=2, quiet=True))
    assert sorted(summary.manifests) == [96, 160]
    small, large = (
        load_records(tmp_path / f"val-{s}", read_manifest(tmp_path / f"val-{s}")) for s in (96, 160)
    )
    assert (np.minimum(small["height"], small["width"]) <= 96).all()
    assert (small["label"] == large["label"]).all()
    assert read_manifest(tmp_path / "val-96").build["built_with_sizes"] == [160, 96]


def _corrupt_source(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True)
    good = jpeg_bytes(200, 300)
    write_train_tar(
        tmp_path / "ILSVRC2012_img_train.tar",
        {
            "n01000000": [
                ("ok_1.JPEG", good),
                ("empty.JPEG", b""),
                ("truncated.JPEG", good[: len(good) // 2]),
            ],
            "n02000000": [("notes.txt", b"not an image at all"), ("ok_2.JPEG", good)],
        },
    )
    return tmp_path


def test_bad_members_are_skipped_and_listed(tmp_path):
    src = _corrupt_source(tmp_path / "src")
    summary = build(
        BuildConfig(src, tmp_path / "out", "train", (160,), "lmdb", workers=0, quiet=True)
    )
    manifest = summary.manifests[160]
    assert manifest.count == 2 and manifest.counts_per_class == [1, 1]
    reasons = {r["name"]: r["reason"] for r in manifest.rejects}
    assert set(reasons) == {"empty.JPEG", "truncated.JPEG", "notes.txt"}
    assert reasons["empty.JPEG"] == "empty file" and "truncated" in reasons["truncated.JPEG"]
    result = CliRunner().invoke(app, ["info", str(tmp_path / "out" / "train-160"), "--json"])
    info = json.loads(result.stdout)
    assert {"count", "num_classes", "prep_size", "rejects"} <= set(info)
    assert info["count"] == 2 and info["num_classes"] == 2 and len(info["rejects"]) == 3


def test_strict_makes_a_reject_fatal(tmp_path):
    src = _corrupt_source(tmp_path / "src")
    with pytest.raises(BuildError, match="--strict: empty.JPEG: empty file"):
        build(
            BuildConfig(
                src, tmp_path / "out", "train", (160,), "lmdb", workers=0, strict=True, quiet=True
            )
        )
    assert not (tmp_path / "out" / "train-160").exists()  # no manifest, no dataset


def test_finished_dataset_is_not_rebuilt_unless_overwrite(sample_src, tmp_path):
    src, _ = sample_src
    config = BuildConfig(src, tmp_path, "val", (160,), "msgpack", workers=0, quiet=True)
    build(config)
    manifest_path = tmp_path / "val-160" / "manifest.json"
    before = manifest_path.stat().st_mtime_ns
    assert build(config).skipped == [160]
    assert manifest_path.stat().st_mtime_ns == before
    rebuilt = build(
        BuildConfig(src, tmp_path, "val", (160,), "msgpack", workers=0, quiet=True, overwrite=True)
    )
    assert rebuilt.skipped == [] and manifest_path.stat().st_mtime_ns != before
    assert not list(tmp_path.glob(".*"))  # no partial or old directories left behind


def test_unfinished_build_with_other_settings_is_refused(sample_src, tmp_path):
    src, _ = sample_src
    partial = tmp_path / ".val-160.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"fingerprint": {"quality": 1}}))
    with pytest.raises(BuildError, match="unfinished build with other settings"):
        build(BuildConfig(src, tmp_path, "val", (160,), "lmdb", workers=0, quiet=True))
    with pytest.raises(Exception, match="no manifest.json"):
        read_manifest(partial)


# msgpack slow: the quick tier kills and resumes lmdb here and rolls msgpack back in test_stores
@pytest.mark.parametrize("store", ["lmdb", pytest.param("msgpack", marks=pytest.mark.slow)])
def test_kill_9_and_resume_gives_identical_output(tmp_path, store):
    src = tmp_path / "src"
    write_sample(src, num_classes=4, train_per_class=30, val_per_class=1, seed=1)
    command = PREP + [
        f"build-{store}",
        "--src",
        str(src),
        "--split",
        "train",
        "--size",
        "160",
        "--size",
        "96",
        "--workers",
        "1",
        "--commit-every",
        "4",
        "-q",
    ]
    subprocess.run(command + ["--out", str(tmp_path / "whole")], check=True, capture_output=True)
    killed = tmp_path / "killed"
    for at_least in (8, 60):  # kill twice, at different points
        process = subprocess.Popen(
            command + ["--out", str(killed)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_progress(killed / ".train-160.partial", process, at_least)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert not (killed / "train-160").exists()  # partial output is never a dataset
    resumed = subprocess.run(
        command + ["--out", str(killed)], check=True, capture_output=True, text=True
    )
    assert "resumed after" in resumed.stdout
    for size in (160, 96):
        whole, again = tmp_path / "whole" / f"train-{size}", killed / f"train-{size}"
        assert (whole / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()
        for name in read_manifest(whole).files:
            # LMDB page layout depends on history; its content digest is in the manifest
            if name != "data.mdb":
                assert (whole / name).read_bytes() == (again / name).read_bytes(), name
        assert dataset_bytes(whole) == dataset_bytes(again)
    assert not list(killed.glob(".*"))


def test_full_disk_is_one_line_and_resumable(sample_src, tmp_path, monkeypatch):
    import errno

    from formats.msgpack_store import MsgpackWriter

    src, _ = sample_src
    original = MsgpackWriter.append
    calls = {"n": 0}

    def append_until_full(self, index, label, jpeg):
        calls["n"] += 1
        if calls["n"] > 17:  # past the first chunk of 16, which was committed
            raise OSError(
                errno.ENOSPC,
                "No space left on device",
                str(self.dataset_dir / "shard-00000.msgpack"),
            )
        return original(self, index, label, jpeg)

    monkeypatch.setattr(MsgpackWriter, "append", append_until_full)
    args = [
        "build-msgpack",
        "--src",
        str(src),
        "--out",
        str(tmp_path),
        "--split",
        "train",
        "--size",
        "160",
        "--workers",
        "0",
        "--commit-every",
        "2",
        "-q",
    ]
    result = _cli(args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "No space left on device" in lines[0]
        and "rerun the same command" in lines[0]
    )
    assert (
        not (tmp_path / "train-160").exists()
        and (tmp_path / ".train-160.partial" / "progress.json").exists()
    )
    monkeypatch.setattr(MsgpackWriter, "append", original)  # space freed: the same command resumes
    resumed = _cli(args)
    assert resumed.exit_code == 0 and "resumed after 16 done earlier" in resumed.stdout
    assert read_manifest(tmp_path / "train-160").count == 18


def test_ctrl_c_is_one_line_and_resumable(tmp_path):
    """Ctrl-C reaches the whole process group (workers too): one line, exit 130, resumable."""
    src = tmp_path / "src"
    write_sample(src, num_classes=3, train_per_class=40, val_per_class=1, seed=2)
    command = PREP + [
        "build-msgpack",
        "--src",
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--size",
        "160",
        "--workers",
        "2",
        "--commit-every",
        "4",
        "-q",
    ]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_progress(tmp_path / "out" / ".train-160.partial", process, 8)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [
        "prep: error: interrupted; rerun the same command to resume"
    ]
    resumed = subprocess.run(command, check=True, capture_output=True, text=True)
    assert (
        "resumed after" in resumed.stdout
        and read_manifest(tmp_path / "out" / "train-160").count == 120
    )


def _cli(args):
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["build-lmdb", "--src", "/nonexistent/x", "--out", "/tmp/unused", "--size", "160"],
            "no such directory",
        ),
        (
            ["build-lmdb", "--src", "{src}", "--out", "{out}", "--size", "160", "--quality", "0"],
            "--quality 0",
        ),
        (
            [
                "build-msgpack",
                "--src",
                "{src}",
                "--out",
                "{out}",
                "--size",
                "160",
                "--split",
                "test",
            ],
            "unknown split",
        ),
        (
            [
                "build-msgpack",
                "--src",
                "{train_only}",
                "--out",
                "{out}",
                "--size",
                "160",
                "--split",
                "val",
            ],
            "no ImageNet val data",
        ),
        (["verify", "{out}"], "no manifest.json"),
        (["info", "{out}/nothing"], "no such dataset directory"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(sample_src, tmp_path, args, message):
    src, _ = sample_src
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "ILSVRC2012_img_train.tar").symlink_to(src / "ILSVRC2012_img_train.tar")
    args = [a.format(src=src, out=tmp_path, train_only=train_only) for a in args]
    result = _cli(args)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prep: error:") and message in lines[0], (
        result.stderr
    )


def test_cli_build_prints_summary(sample_src, tmp_path):
    src, _ = sample_src
    result = _cli(
        [
            "build-msgpack",
            "--src",
            str(src),
            "--out",
            str(tmp_path),
            "--split",
            "val",
            "--size",
            "160",
            "--workers",
            "0",
            "-q",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "val-160: built: 12 records, 3 classes" in result.stdout and "img/s" in result.stdout
    again = _cli(
        [
            "build-msgpack",
            "--src",
            str(src),
            "--out",
            str(tmp_path),
            "--split",
            "val",
            "--size",
            "160",
            "-q",
        ]
    )
    assert "exists, not rebuilt" in again.stdout

"""Failures mid-run are one line and leave the run resumable: a full disk at a checkpoint or a
metrics write (the last good checkpoint kept), a read-only --out, and a corrupt JPEG reaching
train's decoder (naming dataset, record and source member), from loader workers too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import train.run.checkpoint as ckpt
from formats import jpeg
from formats.dataset import RecordDataset
from formats.record import RECORDS_FILE, checksum
from tests.loader_shards import corrupt_record
from train.cli import app
from train.run.metrics import RunLog

PHASES = [
    {"epochs": [0, 2], "prep_size": 160, "crop_size": 32, "batch_size": 4, "lr": [0.05, 0.0]}
]  # conftest's shards: 18 train images, 4 steps an epoch


def train_args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps({"recipe": {"arch": "resnet18"}, "phases": PHASES}))
    return [
        "run",
        "--phases",
        str(phases),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--workers",
        "0",
        "--no-progress",
        "--no-tensorboard",
        "--threads",
        "1",
        *extra,
    ]


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.stderr
    errors = [line for line in lines if line.startswith("train: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert not any(line.startswith(("Traceback", "│", "╭")) for line in lines), result.stderr
    return errors[0]


def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(
    built_shards, tmp_path: Path, monkeypatch
) -> None:
    real_save, saves = ckpt.save_atomic, []

    def disk_fills_up(state, path):
        saves.append(state["global_step"])
        if len(saves) == 3:  # this write gets the kernel's real ENOSPC (/dev/full)
            path.with_name(path.name + ".tmp").symlink_to("/dev/full")
        return real_save(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", disk_fills_up)
    result = CliRunner().invoke(
        app, train_args(tmp_path, built_shards / "lmdb", "--checkpoint-every-steps", "1")
    )
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert one_error_line(result) == (
        f"train: error: cannot save a checkpoint in {last.parent} (No space left on device); "
        f"the last good checkpoint is {last}"
    )
    assert torch.load(last, weights_only=True)["global_step"] == saves[1]
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temp file left
    monkeypatch.setattr(ckpt, "save_atomic", real_save)  # space again: the run resumes
    resumed = CliRunner().invoke(
        app, train_args(tmp_path, built_shards / "lmdb", "--resume", "auto")
    )
    assert resumed.exit_code == 0, resumed.stderr
    assert (last.parent / "final.pt").exists()


def test_full_disk_at_a_metrics_write_is_one_line(
    built_shards, tmp_path: Path, monkeypatch
) -> None:
    real_epoch = RunLog.epoch

    def disk_full_epoch(self, record):
        if self.enabled and not (self.out_dir / "metrics.jsonl").exists():
            (self.out_dir / "metrics.jsonl").symlink_to("/dev/full")
        return real_epoch(self, record)

    monkeypatch.setattr(RunLog, "epoch", disk_full_epoch)
    line = one_error_line(CliRunner().invoke(app, train_args(tmp_path, built_shards / "lmdb")))
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert line == (
        f"train: error: cannot write {metrics} (No space left on device); no "
        "checkpoint was written yet"
    )


def test_read_only_out_is_one_line(built_shards, tmp_path: Path, read_only_dir) -> None:
    out = tmp_path / "run"
    out.mkdir()
    read_only_dir(out)
    line = one_error_line(CliRunner().invoke(app, train_args(tmp_path, built_shards / "lmdb")))
    assert line == (
        f"train: error: {out}: cannot write the run directory (Read-only file "
        f"system: {out / '.lock'})"
    )


@pytest.mark.parametrize(
    ("store", "split", "workers"),
    [("lmdb", "train", "0"), ("msgpack", "train", "2"), ("lmdb", "val", "2")],
)
def test_corrupt_jpeg_in_the_shards_is_one_line_naming_the_record(
    built_shards, tmp_path: Path, store: str, split: str, workers: str
) -> None:
    data = tmp_path / "shards"
    for name in ("train-160", "val-160"):
        shutil.copytree(built_shards / store / name, data / name)
    dataset = RecordDataset(data / f"{split}-160")
    index = 3
    corrupt_record(dataset.dataset_dir, bytes(dataset.view(index)))  # its header zeroed
    name = dataset.name(index)
    dataset.close()
    result = CliRunner().invoke(app, [*train_args(tmp_path, data), "--workers", workers])
    line = one_error_line(result)
    assert line.startswith(
        f"train: error: {data / f'{split}-160'}: record {index} ({name}): cannot decode ("
    ), line


def cut_in_place(dataset_dir: Path, index: int, value: bytes) -> None:
    """End record `index`'s entropy data halfway with an EOI marker, same length, its crc32
    updated: a JPEG cut short that a build before the shared decoder's fix stored (it decoded,
    grey below the cut), which the stored table calls intact."""
    damaged = value[: len(value) // 2] + b"\xff\xd9" + value[len(value) // 2 + 2 :]
    for path in sorted(dataset_dir.glob("*.mdb")) + sorted(dataset_dir.glob("shard-*.msgpack")):
        raw = path.read_bytes()
        if (start := raw.find(value)) >= 0:
            path.write_bytes(raw[:start] + damaged + raw[start + len(value) :])
            break
    else:
        raise AssertionError("record bytes not found in the store files")
    records = np.load(dataset_dir / RECORDS_FILE)
    records["crc32"][index] = checksum(damaged)
    np.save(dataset_dir / RECORDS_FILE, records)


@pytest.mark.skipif(jpeg.turbo() is None, reason="PIL does not surface libjpeg's warnings")
@pytest.mark.parametrize(("store", "workers"), [("lmdb", "0"), ("msgpack", "2")])
def test_stored_jpeg_cut_short_is_one_line_not_grey_training(
    built_shards, tmp_path: Path, store: str, workers: str
) -> None:
    data = tmp_path / "shards"
    for name in ("train-160", "val-160"):
        shutil.copytree(built_shards / store / name, data / name)
    dataset = RecordDataset(data / "train-160")
    index = 5
    value, name = bytes(dataset.view(index)), dataset.name(index)
    dataset.close()
    cut_in_place(data / "train-160", index, value)
    result = CliRunner().invoke(app, [*train_args(tmp_path, data), "--workers", workers])
    line = one_error_line(result)
    assert line.startswith(
        f"train: error: {data / 'train-160'}: record {index} ({name}): "
        "cannot decode (corrupt or truncated JPEG data (libjpeg: "
    ), line
    assert "crc32 differs" not in line  # the stored bytes are as prep wrote them

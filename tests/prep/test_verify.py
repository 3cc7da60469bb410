"""prep verify: clean datasets pass; each kind of damage is caught and named; exit codes follow."""

from __future__ import annotations

import shutil

import lmdb
import numpy as np
import pytest
from typer.testing import CliRunner

from formats.manifest import read_manifest
from formats.record import encode_key
from formats.store import open_reader
from prep.cli import app
from prep.sample import write_sample
from prep.verify import verify


@pytest.fixture
def copy_of(built_shards, tmp_path):
    def make(store: str, split: str = "train"):
        target = tmp_path / f"{store}-{split}"
        shutil.copytree(built_shards / store / f"{split}-160", target)
        return target

    return make


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_clean_dataset_passes_with_source(sample_src, built_shards, store, split):
    report = verify(
        built_shards / store / f"{split}-160", workers=2, src_dir=sample_src[0], quiet=True
    )
    assert report.ok, report.faults
    assert report.records_checked == read_manifest(built_shards / store / f"{split}-160").count


def _flip_inside_record(dataset, record_index):
    """Flip one byte in the middle of a record's JPEG data, wherever the store keeps it."""
    manifest = read_manifest(dataset)
    payload = bytes(open_reader(dataset, manifest).view(record_index))
    target = dataset / ("data.mdb" if manifest.store == "lmdb" else "shard-00000.msgpack")
    blob = bytearray(target.read_bytes())
    at = blob.find(payload) + len(payload) // 2
    blob[at] ^= 0xFF
    target.write_bytes(bytes(blob))


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_flipped_byte(copy_of, store):
    dataset = copy_of(store)
    _flip_inside_record(dataset, 5)
    faults = verify(dataset, workers=1, quiet=True).faults
    assert any(f.startswith("record 5 (") and "checksum mismatch" in f for f in faults), faults


def test_truncated_shard(copy_of):
    dataset = copy_of("msgpack")
    shard = dataset / "shard-00000.msgpack"
    shard.write_bytes(shard.read_bytes()[:-500])
    faults = verify(dataset, workers=1, quiet=True).faults
    assert any("shard-00000.msgpack" in f and "truncated" in f for f in faults), faults


def test_deleted_record(copy_of):
    dataset = copy_of("lmdb")
    with lmdb.open(str(dataset), subdir=True) as env, env.begin(write=True) as txn:
        assert txn.delete(encode_key(7))
    (dataset / "lock.mdb").unlink()
    faults = verify(dataset, workers=1, quiet=True).faults
    assert any(
        "holds 17 records, manifest says 18" in f or "record 7 is missing" in f for f in faults
    ), faults


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_wrong_label(copy_of, store):
    dataset = copy_of(store)
    records = np.load(dataset / "records.npy")
    records["label"][3] = (records["label"][3] + 1) % 3
    np.save(dataset / "records.npy", records)
    faults = verify(dataset, workers=1, quiet=True).faults
    assert any(f.startswith("records.npy: digest") for f in faults), faults
    assert any("per-class counts differ" in f for f in faults), faults
    if store == "msgpack":  # shards carry their labels, so the record itself is caught too
        assert any(f.startswith("record 3 (") and "label" in f for f in faults), faults


def test_missing_file_and_extra_shard(copy_of):
    dataset = copy_of("msgpack", "val")
    (dataset / "names.txt").unlink()
    shutil.copy(dataset / "shard-00000.msgpack", dataset / "shard-00007.msgpack")
    faults = verify(dataset, workers=1, quiet=True).faults
    assert "names.txt: missing" in faults
    assert any("shard-00007.msgpack: shard not in the manifest" in f for f in faults), faults


def test_source_mismatch(built_shards, tmp_path):
    other = tmp_path / "other"
    write_sample(other, num_classes=3, train_per_class=7, val_per_class=4, seed=5)
    faults = verify(
        built_shards / "msgpack" / "train-160", workers=1, src_dir=other, quiet=True
    ).faults
    assert any("source has 21 members, dataset accounts for 18" in f for f in faults), faults


def test_cli_exit_codes(sample_src, built_shards, copy_of):
    runner = CliRunner()
    clean = runner.invoke(
        app, ["verify", str(built_shards / "lmdb" / "val-160"), "-q", "--workers", "1"]
    )
    assert clean.exit_code == 0 and clean.stdout.strip().endswith("OK")
    dataset = copy_of("msgpack")
    _flip_inside_record(dataset, 2)
    broken = runner.invoke(app, ["verify", str(dataset), "-q", "--workers", "1"])
    assert (
        broken.exit_code == 1
        and "2 FAULTS" in broken.stdout
        and "shard-00000.msgpack: digest" in broken.stdout
        and "record 2 (" in broken.stdout
    )


def test_verify_workers_load_the_names_only_for_a_fault(copy_of, monkeypatch):
    """Each worker held all names (1.28M strings, ~110 MB, for ImageNet train) only to name
    faults: a clean range never loads them; a fault still names its record."""
    import prep.verify as verify_module

    dataset = copy_of("msgpack")
    manifest = read_manifest(dataset)
    loads = []
    real_load_names = verify_module.load_names
    monkeypatch.setattr(
        verify_module, "load_names", lambda d, m: loads.append(d) or real_load_names(d, m)
    )
    verify_module._init_worker(dataset, manifest)  # a worker's life, in this process
    assert verify_module._check_range(0, manifest.count) == (manifest.count, []) and loads == []
    _flip_inside_record(dataset, 5)
    count, faults = verify_module._check_range(0, manifest.count)
    name = real_load_names(dataset, manifest)[5]
    assert len(loads) == 1 and faults[0].startswith(f"record 5 ({name}): checksum mismatch"), faults

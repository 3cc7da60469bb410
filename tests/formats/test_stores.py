"""formats: every writer/reader pair round-trips; readers are zero-copy, fork- and pickle-safe,
and refuse incomplete or unknown datasets."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest

from formats import DatasetError
from formats.lmdb_store import LmdbReader, LmdbWriter, content_digest
from formats.manifest import read_manifest
from formats.msgpack_store import INDEX_FILE, MsgpackReader, MsgpackWriter, iter_shard
from formats.record import MANIFEST_FILE, checksum, encode_key

PAYLOADS = [os.urandom(n) for n in (1, 50, 3000, 17, 70000, 5, 999)]


def write_all(writer, payloads, start=0):
    for index, payload in enumerate(payloads[start:], start=start):
        writer.append(index, index % 3, payload)
    writer.commit()


def test_keys_sort_like_indices():
    keys = [encode_key(i) for i in (0, 9, 10, 99, 100, 12345)]
    assert keys == sorted(keys)


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_round_trip_zero_copy(tmp_path, store):
    writer = LmdbWriter(tmp_path) if store == "lmdb" else MsgpackWriter(tmp_path, shard_bytes=40000)
    write_all(writer, PAYLOADS)
    writer.finish()
    reader = (
        LmdbReader(tmp_path, len(PAYLOADS))
        if store == "lmdb"
        else MsgpackReader(tmp_path, len(PAYLOADS))
    )
    for index, payload in enumerate(PAYLOADS):
        view = reader.view(index)
        assert isinstance(view, memoryview)
        assert bytes(view) == payload
    with pytest.raises(IndexError):
        reader.view(len(PAYLOADS))
    reader.close()


def test_msgpack_rolls_shards_and_streams(tmp_path):
    writer = MsgpackWriter(tmp_path, shard_bytes=40000)
    write_all(writer, PAYLOADS)
    files = writer.finish()
    shards = sorted(name for name in files if name.startswith("shard-"))
    assert len(shards) >= 2 and INDEX_FILE in files
    streamed = [record for shard in shards for record in iter_shard(tmp_path / shard)]
    assert streamed == [(i, i % 3, p) for i, p in enumerate(PAYLOADS)]
    reader = MsgpackReader(tmp_path, len(PAYLOADS))
    assert reader.record(4)[:2] == (4, 1)


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_reopen_rolls_back_to_kept_records(tmp_path, store):
    """A resumed build drops whatever got past its saved progress and rewrites it identically."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    make = (
        (lambda d, keep=0: LmdbWriter(d, keep))
        if store == "lmdb"
        else (lambda d, keep=0: MsgpackWriter(d, keep, shard_bytes=40000))
    )
    uninterrupted = make(full)
    write_all(uninterrupted, PAYLOADS)
    first = make(resumed)
    write_all(first, PAYLOADS)  # got to the end, but progress only says 3 were saved
    first.close()
    second = make(resumed, 3)
    assert second.count() == 3
    write_all(second, PAYLOADS, start=3)
    digests = [uninterrupted.finish(), second.finish()]
    assert digests[0] == digests[1]
    if store == "msgpack":  # shard files are byte-identical, not only their records
        for name in digests[0]:
            assert (full / name).read_bytes() == (resumed / name).read_bytes()


def test_rollback_beyond_store_is_refused(tmp_path):
    write_all(MsgpackWriter(tmp_path), PAYLOADS[:2])
    with pytest.raises(DatasetError, match="progress says 5"):
        MsgpackWriter(tmp_path, keep_records=5)


def test_lmdb_content_digest_ignores_history(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    writer = LmdbWriter(a)
    write_all(writer, PAYLOADS)
    writer.finish()
    writer = LmdbWriter(b)
    write_all(writer, PAYLOADS[:5])
    writer.close()
    writer = LmdbWriter(b, keep_records=2)
    write_all(writer, PAYLOADS, start=2)
    writer.finish()
    assert content_digest(a) == content_digest(b)
    assert content_digest(a)["records"] == len(PAYLOADS)


def _read_in_child(reader, queue):
    queue.put([checksum(reader.view(i)) for i in range(len(reader))])


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_reader_survives_fork_and_pickle(tmp_path, store):
    writer = LmdbWriter(tmp_path) if store == "lmdb" else MsgpackWriter(tmp_path)
    write_all(writer, PAYLOADS)
    writer.finish()
    reader = (
        LmdbReader(tmp_path, len(PAYLOADS))
        if store == "lmdb"
        else MsgpackReader(tmp_path, len(PAYLOADS))
    )
    expected = [checksum(p) for p in PAYLOADS]
    # opened in the parent
    assert [checksum(reader.view(i)) for i in range(len(PAYLOADS))] == expected
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_read_in_child, args=(reader, queue))
    child.start()
    assert queue.get(timeout=30) == expected
    child.join(timeout=30)
    clone = pickle.loads(pickle.dumps(reader))
    assert [checksum(clone.view(i)) for i in range(len(PAYLOADS))] == expected


def test_lmdb_reader_refuses_count_mismatch(tmp_path):
    writer = LmdbWriter(tmp_path)
    write_all(writer, PAYLOADS)
    writer.finish()
    with pytest.raises(DatasetError, match="manifest says 99"):
        LmdbReader(tmp_path, 99).view(0)


def test_manifest_required_and_versioned(built_shards, tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(DatasetError, match="no such dataset directory"):
        read_manifest(tmp_path / "missing")
    dataset = built_shards / "msgpack" / "train-160"
    manifest = read_manifest(dataset)
    assert manifest.count == 18 and manifest.num_classes == 3 and manifest.prep_size == 160
    raw = json.loads((dataset / MANIFEST_FILE).read_text())
    copy = tmp_path / "future"
    copy.mkdir()
    (copy / MANIFEST_FILE).write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(DatasetError, match="format_version 99"):
        read_manifest(copy)
    (copy / MANIFEST_FILE).write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(DatasetError, match="unknown"):
        read_manifest(copy)
    (copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DatasetError, match="unreadable manifest"):
        read_manifest(copy)


def test_manifest_fields_are_the_documented_schema(built_shards):
    manifest = read_manifest(built_shards / "lmdb" / "val-160")
    fields = dataclasses.asdict(manifest)
    for key in (
        "format_version",
        "build",
        "source",
        "split",
        "prep_size",
        "quality",
        "counts_per_class",
        "classes",
        "class_names",
        "rejects",
        "files",
    ):
        assert key in fields
    assert manifest.classes == sorted(manifest.classes)
    assert all(manifest.class_names)  # the devkit's names
    assert manifest.build["tool_version"] and manifest.build["codecs"]["pil"]
    assert np.sum(manifest.counts_per_class) == manifest.count == 12


def test_write_atomic_all_or_nothing(tmp_path):
    from formats import write_atomic

    target = tmp_path / "table.bin"
    write_atomic(target, lambda f: f.write(b"old"))

    def fails_halfway(f):
        f.write(b"new but partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, fails_halfway)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "table.bin"
    ]

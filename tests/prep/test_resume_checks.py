"""A resumed build trusts nothing an earlier run left: kept records that are not what their
table rows say (two builds once wrote one output at the same time) make it refuse, saying to
pass --overwrite, instead of finishing a dataset that `prep verify` would fault."""

from __future__ import annotations

import dataclasses
import errno

import lmdb
import numpy as np
import pytest

from formats.lmdb_store import LmdbWriter
from formats.msgpack_store import INDEX_DTYPE, INDEX_PARTIAL_FILE, MsgpackWriter, shard_file_name
from formats.record import encode_key
from prep.build import BuildConfig, build
from prep.partial import BuildError
from prep.verify import verify

KEPT = 16  # the interrupted build commits its first chunk of 16, then the disk "fills"


def _interrupted(sample_src, tmp_path, monkeypatch, store) -> BuildConfig:
    src, _ = sample_src
    writer = LmdbWriter if store == "lmdb" else MsgpackWriter
    original, calls = writer.append, {"n": 0}

    def append_until_full(self, index, label, jpeg):
        calls["n"] += 1
        if calls["n"] > KEPT + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, index, label, jpeg)

    config = BuildConfig(
        src, tmp_path, "train", (64,), store, workers=0, quiet=True, commit_every=2
    )
    with monkeypatch.context() as patch:
        patch.setattr(writer, "append", append_until_full)
        with pytest.raises(BuildError, match="No space left"):
            build(config)
    return config


def _flip_stored_byte(partial, store):
    if store == "lmdb":
        env = lmdb.open(str(partial), map_size=1 << 30)
        with env.begin(write=True) as txn:
            value = bytearray(txn.get(encode_key(5)))
            value[len(value) // 2] ^= 0x20
            txn.put(encode_key(5), bytes(value))
        env.close()
    else:
        shard = partial / shard_file_name(0)
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x20
        shard.write_bytes(bytes(data))


def _swap_index_rows(partial, store):
    if store == "lmdb":
        pytest.skip("LMDB has no row index")
    path = partial / INDEX_PARTIAL_FILE
    rows = np.fromfile(path, INDEX_DTYPE)
    rows[[3, 4]] = rows[[4, 3]]
    rows.tofile(path)


def _change_a_table_label(partial, store):
    from formats.record import RECORD_DTYPE

    path = partial / "records.partial"
    rows = np.fromfile(path, RECORD_DTYPE)
    rows["label"][7] = (rows["label"][7] + 1) % 3
    if store == "lmdb":  # labels live only in the table there: change a checksum instead
        rows["crc32"][7] ^= 1
    rows.tofile(path)


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
@pytest.mark.parametrize("damage", [_flip_stored_byte, _swap_index_rows, _change_a_table_label])
def test_damaged_unfinished_build_is_refused_not_finished(
    sample_src, tmp_path, monkeypatch, store, damage
):
    config = _interrupted(sample_src, tmp_path, monkeypatch, store)
    damage(tmp_path / ".train-64.partial", store)
    with pytest.raises(
        BuildError, match=r"the unfinished build is damaged \(record \d+ .*pass --overwrite"
    ):
        build(config)
    assert not (tmp_path / "train-64").exists()
    rebuilt = build(dataclasses.replace(config, overwrite=True))
    assert rebuilt.resumed_from == 0 and verify(tmp_path / "train-64", workers=1, quiet=True).ok


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_intact_unfinished_build_resumes(sample_src, tmp_path, monkeypatch, store):
    config = _interrupted(sample_src, tmp_path, monkeypatch, store)
    resumed = build(config)
    assert resumed.resumed_from == KEPT and verify(tmp_path / "train-64", workers=1, quiet=True).ok


@pytest.mark.parametrize("text", ["{not json", '{"fingerprint": {}, "unknown_field": 1}', "[]"])
def test_unreadable_progress_file_is_one_line(sample_src, tmp_path, text):
    src, _ = sample_src
    partial = tmp_path / ".val-64.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(text)
    with pytest.raises(BuildError, match="progress.json: unreadable .*pass --overwrite"):
        build(BuildConfig(src, tmp_path, "val", (64,), "lmdb", workers=0, quiet=True))

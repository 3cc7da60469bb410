"""formats.dataset: both stores through one torch-free dataset, zero-copy views, lazy names,
fork safety, record-naming errors, and import hygiene (formats stays importable without torch)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from formats import DatasetError
from formats.dataset import ImageDataset, RecordDataset
from formats.manifest import load_names, read_manifest
from tests.loader_shards import STORES, corrupt_record, damaged_copy, dataset_dir


@pytest.mark.parametrize("store", STORES)
def test_records_are_memoryviews_with_labels(built_shards, store):
    dataset = RecordDataset(dataset_dir(built_shards, store))
    assert len(dataset) == 18 and dataset.num_classes == 3
    view, label = dataset[5]
    assert isinstance(view, memoryview) and bytes(view[:3]) == b"\xff\xd8\xff"
    assert label == dataset.labels[5] and dataset.labels.dtype == np.int64
    assert sorted(np.bincount(dataset.labels).tolist()) == [6, 6, 6]
    assert np.allclose(dataset.aspect_ratios(), dataset.widths / dataset.heights)


def test_both_stores_hold_the_same_bytes(built_shards):
    lmdb_set, msgpack_set = (RecordDataset(dataset_dir(built_shards, store)) for store in STORES)
    for index in range(len(lmdb_set)):
        assert bytes(lmdb_set.view(index)) == bytes(msgpack_set.view(index))


def test_names_load_only_on_demand_and_never_pickle(built_shards):
    directory = dataset_dir(built_shards)
    dataset = RecordDataset(directory)
    dataset.view(0)
    assert dataset._names is None
    assert dataset.name(3) == load_names(directory, read_manifest(directory))[3]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._names is None and bytes(clone.view(3)) == bytes(dataset.view(3))


@pytest.mark.parametrize("store", STORES)
def test_read_before_and_after_fork(built_shards, store):
    """Opened in the parent, read in a forked child: the reader reopens per process."""
    dataset = RecordDataset(dataset_dir(built_shards, store))
    expected = bytes(dataset.view(7))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: whatever happens, it must never return into pytest
        ok = False
        try:
            ok = bytes(dataset.view(7)) == expected and bytes(dataset.view(1)) == bytes(
                dataset.view(1)
            )
        finally:
            try:
                os.write(write_end, b"1" if ok else b"0")
            finally:
                os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 1) == b"1"
    os.waitpid(pid, 0)
    assert bytes(dataset.view(7)) == expected


@pytest.mark.parametrize("store", STORES)
def test_threads_read_concurrently(built_shards, store):
    from concurrent.futures import ThreadPoolExecutor

    dataset = RecordDataset(dataset_dir(built_shards, store))
    expected = [bytes(dataset.view(index)) for index in range(len(dataset))]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda index: bytes(dataset.view(index % 18)), range(200)))
    assert got == [expected[index % 18] for index in range(200)]


def test_image_dataset_works_with_a_plain_dataloader(built_shards):
    torch = pytest.importorskip("torch")
    dataset = ImageDataset(
        dataset_dir(built_shards, "msgpack"),
        transform=lambda image: torch.from_numpy(np.array(image.resize((32, 32)))),
    )
    image, label = dataset[0]
    assert image.shape == (32, 32, 3) and label == dataset.labels[0]
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=1)
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert labels.tolist() == dataset.labels.tolist()


def test_missing_directory_and_manifest_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset directory"):
        RecordDataset(tmp_path / "train-160")
    (tmp_path / "half").mkdir()
    with pytest.raises(DatasetError, match="no manifest.json"):
        RecordDataset(tmp_path / "half")


def test_truncated_msgpack_shard_names_record_at_open(built_shards, tmp_path):
    directory = damaged_copy(dataset_dir(built_shards, "msgpack"), tmp_path / "train-160")
    shard = directory / "shard-00000.msgpack"
    shard.write_bytes(shard.read_bytes()[:-100])
    name = load_names(directory, read_manifest(directory))[17]
    with pytest.raises(DatasetError) as raised:
        RecordDataset(directory)
    message = str(raised.value)
    assert (
        str(directory) in message
        and "record 17" in message
        and name in message
        and "truncated" in message
    )


def test_missing_lmdb_file_is_clear(built_shards, tmp_path):
    directory = damaged_copy(dataset_dir(built_shards, "lmdb"), tmp_path / "train-160")
    (directory / "data.mdb").unlink()
    with pytest.raises(DatasetError, match="no data.mdb"):
        RecordDataset(directory)


def test_corrupt_record_error_names_dir_index_name_and_checksum(built_shards, tmp_path):
    source = RecordDataset(dataset_dir(built_shards, "lmdb"))
    directory = damaged_copy(source.dataset_dir, tmp_path / "train-160")
    corrupt_record(directory, bytes(source.view(4)))
    dataset = ImageDataset(directory)
    with pytest.raises(DatasetError) as raised:
        dataset[4]
    message = str(raised.value)
    assert message.startswith(f"{directory}: record 4 ({dataset.name(4)}): cannot decode")
    assert "crc32 differs" in message


def test_formats_and_prep_never_import_torch_or_the_dataset():
    code = (
        "import sys, formats, formats.store, prep.build, prep.cli, prep.verify\n"
        "assert 'formats.dataset' not in sys.modules and 'torch' not in sys.modules\n"
        "import formats.dataset\nassert 'torch' not in sys.modules\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2]
    )

"""prep merge checks every part against its own manifest before writing anything: a flipped
byte in a shard or in data.mdb, a changed label in records.npy, two swapped names in names.txt
are refused with one line naming the part and the fault; nothing is merged, no existing dataset
is replaced (--overwrite included), and the "remove the parts" hint comes only after success."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from formats.manifest import read_manifest
from formats.msgpack_store import MsgpackWriter
from formats.store import open_reader
from prep.build import BuildConfig, build
from prep.cli import app
from prep.merge import merge
from prep.partial import BuildError
from prep.parts import PartSpec
from prep.sample import write_sample
from prep.verify import verify

PREP_SIZE = 48


@pytest.fixture(scope="module")
def parts_by_store(tmp_path_factory) -> dict[str, list[Path]]:
    """Both stores, 2 parts each, of 3 classes x 6 train images; copied per test before damage."""
    root = tmp_path_factory.mktemp("merge_checks")
    src = root / "src"
    write_sample(src, num_classes=3, train_per_class=6, val_per_class=1, seed=5)
    parts = {}
    for store in ("msgpack", "lmdb"):
        for index in range(2):
            build(
                BuildConfig(
                    src_dir=src,
                    out_dir=root / store,
                    split="train",
                    prep_sizes=(PREP_SIZE,),
                    store=store,
                    workers=0,
                    quiet=True,
                    commit_every=4,
                    part=PartSpec(index, 2),
                )
            )
        parts[store] = sorted((root / store).glob(f"train-{PREP_SIZE}.part-*"))
    return parts


@pytest.fixture
def parts(parts_by_store, tmp_path, request) -> list[Path]:
    copies = []
    for part_dir in parts_by_store[getattr(request, "param", "msgpack")]:
        copies.append(tmp_path / "parts" / part_dir.name)
        shutil.copytree(part_dir, copies[-1])
    return copies


def flip_record_byte(part_dir: Path, index: int = 1) -> None:
    """One byte inside a stored JPEG, found in the store's file (shard or data.mdb)."""
    manifest = read_manifest(part_dir)
    reader = open_reader(part_dir, manifest)
    value = bytes(reader.view(index))
    reader.close()
    store_file = part_dir / ("data.mdb" if manifest.store == "lmdb" else "shard-00000.msgpack")
    raw = bytearray(store_file.read_bytes())
    at = raw.find(value) + len(value) // 2
    raw[at] ^= 0x10
    store_file.write_bytes(bytes(raw))


def change_label(part_dir: Path) -> None:
    path = part_dir / "records.npy"
    records = np.load(path)
    records["label"][0] = (records["label"][0] + 1) % 3
    np.save(path, records)


def swap_names(part_dir: Path) -> None:
    path = part_dir / "names.txt"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    path.write_bytes(b"".join(lines))


DAMAGES = {
    "flipped byte": (flip_record_byte, "digest"),
    "changed label": (change_label, "records.npy"),
    "swapped names": (swap_names, "names.txt"),
}


@pytest.mark.parametrize("parts", ["msgpack", "lmdb"], indirect=True)
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_part_is_refused_before_anything_is_written(parts, tmp_path, damage):
    damage_part, fault = DAMAGES[damage]
    damage_part(parts[1])
    assert not verify(parts[1], workers=1, quiet=True).ok  # what prep verify already said
    result = CliRunner().invoke(
        app, ["merge", *map(str, parts), "--out", str(tmp_path / "merged"), "-q"]
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(parts[1]) in lines[0] and "damaged part" in lines[0] and fault in lines[0], lines[0]
    assert "no longer needed" not in result.stdout
    assert not (tmp_path / "merged").exists() or list((tmp_path / "merged").iterdir()) == []


def test_overwrite_with_a_damaged_part_keeps_the_good_dataset(parts, tmp_path):
    merged = tmp_path / "merged" / f"train-{PREP_SIZE}"
    merge(parts, tmp_path / "merged", quiet=True)
    good_manifest = (merged / "manifest.json").read_bytes()
    swap_names(parts[0])
    result = CliRunner().invoke(
        app, ["merge", *map(str, parts), "--out", str(tmp_path / "merged"), "--overwrite", "-q"]
    )
    assert result.exit_code == 1 and "damaged part" in result.stderr
    assert (merged / "manifest.json").read_bytes() == good_manifest
    assert verify(merged, workers=1, quiet=True).ok


def test_bytes_changed_after_the_check_are_not_copied(parts, tmp_path, monkeypatch):
    """The per-record crc32 at copy time: a part that changes after check_parts passed."""
    import prep.merge as merge_module

    original = merge_module.check_parts

    def check_then_damage(unchecked):
        checked = original(unchecked)
        flip_record_byte(parts[1])
        return checked

    monkeypatch.setattr(merge_module, "check_parts", check_then_damage)
    with pytest.raises(BuildError, match=r"part-1-of-2: record 1 changed while merging"):
        merge(parts, tmp_path / "merged", quiet=True)
    assert not (tmp_path / "merged" / f"train-{PREP_SIZE}").exists()


def test_a_merge_that_fails_its_own_check_replaces_nothing(parts, tmp_path, monkeypatch):
    merged = tmp_path / "merged" / f"train-{PREP_SIZE}"
    merge(parts, tmp_path / "merged", quiet=True)
    good_manifest = (merged / "manifest.json").read_bytes()
    original = MsgpackWriter.finish

    def finish_then_corrupt(self):  # the store goes bad on disk after the writer digested it
        files = original(self)
        shard = self.dataset_dir / "shard-00000.msgpack"
        raw = bytearray(shard.read_bytes())
        raw[-5] ^= 0x01
        shard.write_bytes(bytes(raw))
        return files

    monkeypatch.setattr(MsgpackWriter, "finish", finish_then_corrupt)
    with pytest.raises(
        BuildError, match="merged output fails its check .*shard-00000.msgpack: digest"
    ):
        merge(parts, tmp_path / "merged", overwrite=True, quiet=True)
    assert (merged / "manifest.json").read_bytes() == good_manifest
    monkeypatch.undo()
    merge(parts, tmp_path / "merged", overwrite=True, quiet=True)  # as the message says
    assert verify(merged, workers=1, quiet=True).ok


def test_a_good_merge_says_the_parts_can_go(parts, tmp_path):
    result = CliRunner().invoke(
        app, ["merge", *map(str, parts), "--out", str(tmp_path / "merged"), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "merged dataset checked: the 2 part directories are no longer needed" in result.stdout
    assert verify(tmp_path / "merged" / f"train-{PREP_SIZE}", workers=1, quiet=True).ok

"""Mirrors read in place (prep.mirrors): each layout, written here in its exact file layout,
builds the records the official train tar builds from the same images (labels, sizes, pixels
via crc32 of identical stored bytes; only the names differ: each keeps its source's own name),
is named in the summary and the manifest, works in parts + merge and under `verify --source`.

Layouts as documented: HF ILSVRC/imagenet-1k's loading script (tar.gz members
`<IMAGE_FILENAME>_<SYNSET_ID>.JPEG`, ClassLabel names = IMAGENET2012_CLASSES, sorted wnids; its
parquet revision keeps that ClassLabel), timm/imagenet-1k-wds's card (`imagenet1k-train-{0000..1023}
.tar`, `.jpg`/`.cls`/`.json` per sample, converted from TFDS imagenet2012)."""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from formats.manifest import load_names, load_records, read_manifest
from formats.store import open_reader
from prep.build import BuildConfig, build
from prep.cli import app
from prep.merge import merge
from prep.parts import PartSpec
from prep.sources import open_source
from prep.verify import verify
from tests.prep import layouts

WRITERS = {
    "hf-parquet": functools.partial(layouts.write_hf_parquet, row_group_rows=3),
    "hf-targz": layouts.write_hf_targz,
    "wds-imagenet1k": layouts.write_timm_wds,
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """layout -> src dir, all holding the same 12 images of classes 0, 7 and 999."""
    root = tmp_path_factory.mktemp("mirrors")
    items = layouts.images()
    layouts.write_official_train(root / "train-tar", items)
    for layout, write in WRITERS.items():
        write(root / layout, items)
    return root


def built(src, out, **changes):
    fields = dict(
        src_dir=src,
        out_dir=out,
        split="train",
        prep_sizes=(32,),
        store="lmdb",
        workers=0,
        quiet=True,
        commit_every=4,
    )
    return build(BuildConfig(**{**fields, **changes}))


@pytest.fixture(scope="module")
def official(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("official")
    built(sources / "train-tar", out)
    return out / "train-32"


def stored_bytes(dataset_dir):
    manifest = read_manifest(dataset_dir)
    reader = open_reader(dataset_dir, manifest)
    try:
        return [bytes(reader.view(i)) for i in range(manifest.count)]
    finally:
        reader.close()


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_each_layout_builds_the_official_records(sources, official, tmp_path, layout):
    summary = built(sources / layout, tmp_path)
    assert summary.source_layout == layout
    dataset = tmp_path / "train-32"
    manifest = read_manifest(dataset)
    assert manifest.source["layout"] == layout and manifest.rejects == []
    assert manifest.classes == read_manifest(official).classes  # the 1000 wnids, sorted
    expected = load_records(official, read_manifest(official))
    assert np.array_equal(load_records(dataset, manifest), expected)
    assert sorted(set(expected["label"].tolist())) == list(layouts.CLASS_POSITIONS)
    assert stored_bytes(dataset) == stored_bytes(official)
    names = load_names(dataset, manifest)
    assert names[0] in ("n01440764_1_n01440764.JPEG", "n01440764_1.jpg")  # the source's own names
    report = verify(dataset, workers=1, src_dir=sources / layout, quiet=True)
    assert report.ok, report.faults


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_parts_merge_to_a_single_build(sources, tmp_path, layout):
    built(sources / layout, tmp_path / "single")
    for index in range(3):
        built(sources / layout, tmp_path / "parts", part=PartSpec(index, 3))
    parts = sorted((tmp_path / "parts").glob("train-32.part-*"))
    counts = [read_manifest(p).build["part"]["num_members"] for p in parts]
    assert sum(counts) == 12 and max(counts) < 12  # the members are spread, each once
    merge(parts, tmp_path / "merged", quiet=True)
    single, merged = tmp_path / "single" / "train-32", tmp_path / "merged" / "train-32"
    assert (single / "manifest.json").read_bytes() == (merged / "manifest.json").read_bytes()
    assert (single / "records.npy").read_bytes() == (merged / "records.npy").read_bytes()


def test_cli_names_the_layout_and_reads_an_hf_cache_snapshot(sources, tmp_path):
    """--src as the HF cache keeps it: datasets--ILSVRC--imagenet-1k/{refs/main, snapshots/<rev>/
    data/*.parquet -> ../../../blobs/<hash>}."""
    cache = tmp_path / "datasets--ILSVRC--imagenet-1k"
    snapshot = cache / "snapshots" / "abc123" / "data"
    snapshot.mkdir(parents=True)
    (cache / "blobs").mkdir()
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    for i, parquet in enumerate(sorted((sources / "hf-parquet" / "data").iterdir())):
        blob = cache / "blobs" / f"blob{i}"
        blob.write_bytes(parquet.read_bytes())
        (snapshot / parquet.name).symlink_to(os.path.relpath(blob, snapshot))
    for src in (cache, cache / "snapshots" / "abc123"):
        out = tmp_path / f"out-{src.name}"
        result = CliRunner().invoke(
            app,
            [
                "build-msgpack",
                "--src",
                str(src),
                "--out",
                str(out),
                "--size",
                "32",
                "--workers",
                "0",
                "-q",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "source: hf-parquet layout" in result.output
        assert read_manifest(out / "train-32").count == 12
        check = CliRunner().invoke(
            app, ["verify", str(out / "train-32"), "--source", str(src), "--workers", "1", "-q"]
        )
        assert check.exit_code == 0 and ": OK" in check.output, check.output


def test_generic_webdataset_labels_by_class_folder_like_folders(tmp_path):
    items = layouts.images()
    layouts.write_generic_wds(tmp_path / "wds", items)
    layouts.write_folders(tmp_path / "folders", items)
    for name in ("wds", "folders"):
        built(tmp_path / name, tmp_path / f"out-{name}")
    wds, folders = tmp_path / "out-wds" / "train-32", tmp_path / "out-folders" / "train-32"
    assert read_manifest(wds).source["layout"] == "wds"
    assert read_manifest(wds).classes == read_manifest(folders).classes
    assert np.array_equal(
        load_records(wds, read_manifest(wds)), load_records(folders, read_manifest(folders))
    )


def test_generic_webdataset_with_cls(tmp_path):
    layouts.wds_tar(
        tmp_path / "own-train-0.tar",
        [
            [("a.png", layouts.jpeg_bytes(20, 20)), ("a.cls", b"2\n")],
            [("b.jpeg", layouts.jpeg_bytes(20, 24)), ("b.cls", b"0")],
        ],
    )
    source = open_source(tmp_path, "train")
    assert source.layout == "wds" and source.classes == ["0", "1", "2"]
    assert [(m.name, m.label, m.skip_reason) for m in source.members()] == [
        ("a.png", 2, ""),
        ("b.jpeg", 0, ""),
    ]


def test_parquet_without_pyarrow_is_one_line_naming_the_extra(sources, tmp_path, monkeypatch):
    for module in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    result = CliRunner().invoke(
        app,
        [
            "build-lmdb",
            "--src",
            str(sources / "hf-parquet"),
            "--out",
            str(tmp_path),
            "--size",
            "32",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "prep: error: reading Hugging Face parquet needs pyarrow: pip install 'shardtrain[hf]'"
    ]
    assert not list(tmp_path.iterdir())


def test_validation_files_are_the_val_split(tmp_path):
    """HF and timm call it `validation`; prep's --split val finds those files, not train's."""
    items = layouts.images()
    layouts.write_hf_parquet(tmp_path / "hf", items[:3], split="val", num_files=1)
    layouts.write_hf_parquet(tmp_path / "hf", items[3:], split="train", num_files=1)
    source = open_source(tmp_path / "hf", "val")
    assert source.layout == "hf-parquet" and [m.label for m in source.members()] == [0, 0, 0]
    layouts.wds_tar(
        tmp_path / "wds" / "imagenet1k-validation-00.tar",
        [[("v.jpg", items[-1][2]), ("v.cls", b"999")]],
    )
    layouts.wds_tar(
        tmp_path / "wds" / "imagenet1k-train-0000.tar", [[("t.jpg", items[0][2]), ("t.cls", b"0")]]
    )
    assert [(m.name, m.label) for m in open_source(tmp_path / "wds", "val").members()] == [
        ("v.jpg", 999)
    ]


def test_hf_cache_with_several_snapshots_and_no_ref_is_one_line(sources, tmp_path):
    for revision in ("rev1", "rev2"):
        (tmp_path / "datasets--ILSVRC--imagenet-1k" / "snapshots" / revision / "data").mkdir(
            parents=True
        )
    result = CliRunner().invoke(
        app,
        [
            "build-lmdb",
            "--src",
            str(tmp_path / "datasets--ILSVRC--imagenet-1k"),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "32",
        ],
    )
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "2 snapshots and no refs/main" in result.output

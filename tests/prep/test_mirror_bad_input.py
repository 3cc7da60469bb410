"""Bad mirror input: each damaged or odd member is one listed reject while the rest is built,
and damage that leaves nothing to trust after it (a corrupt gzip stream, a truncated parquet
file or row group, a damaged shard) is one line on stderr and exit 1: never a traceback, a hang
or a silent drop."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from formats.manifest import read_manifest
from prep.cli import app
from tests.prep import layouts
from tests.prep.layouts import jpeg_bytes

GOOD = jpeg_bytes(24, 30)


def run_build(src, out, *extra):
    return CliRunner().invoke(
        app,
        [
            "build-lmdb",
            "--src",
            str(src),
            "--out",
            str(out),
            "--size",
            "16",
            "--workers",
            "0",
            "-q",
            *extra,
        ],
    )


def assert_one_line(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prep: error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def rejects(out):
    return {r["name"]: r["reason"] for r in read_manifest(out / "train-16").rejects}


def test_parquet_bad_labels_are_listed_rejects(tmp_path):
    rows = [
        {"image": {"bytes": GOOD, "path": name}, "label": label}
        for name, label in [
            ("ok.JPEG", 5),
            ("big.JPEG", 1000),
            ("neg.JPEG", -7),
            ("test.JPEG", -1),
            ("none.JPEG", None),
            ("ok.JPEG", 6),
        ]
    ]
    rows.append({"image": {"bytes": None, "path": "empty.JPEG"}, "label": 3})
    rows.append({"image": {"bytes": b"not an image", "path": "junk.JPEG"}, "label": 3})
    layouts.write_parquet(
        tmp_path / "src" / "data" / "train-00000-of-00001.parquet", rows, row_group_rows=8
    )
    result = run_build(tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0, result.output
    listed = rejects(tmp_path / "out")
    assert read_manifest(tmp_path / "out" / "train-16").count == 1
    assert "outside 0..999" in listed["big.JPEG"] and "outside 0..999" in listed["neg.JPEG"]
    assert "unlabelled" in listed["test.JPEG"] and "no integer label" in listed["none.JPEG"]
    assert "duplicate name" in listed["ok.JPEG"] and "no image bytes" in listed["empty.JPEG"]
    assert "junk.JPEG" in listed and len(listed) == 7


def test_parquet_with_another_class_count_is_one_line(tmp_path):
    names = {"info": {"features": {"label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}}}
    path = layouts.write_parquet(
        tmp_path / "data" / "train-00000-of-00001.parquet",
        [{"image": {"bytes": GOOD, "path": "a.JPEG"}, "label": 0}],
        metadata=names,
    )
    assert_one_line(run_build(tmp_path, tmp_path / "out"), str(path), "2 classes", "1000")


def test_parquet_without_the_columns_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(
        pa.table({"img": [GOOD], "label": [0]}), tmp_path / "data" / "train-00000-of-00001.parquet"
    )
    assert_one_line(run_build(tmp_path, tmp_path / "out"), "expected columns image")


def test_truncated_parquet_file_is_one_line(tmp_path):
    [path, _] = layouts.write_hf_parquet(tmp_path, layouts.images())
    path.write_bytes(path.read_bytes()[:-100])
    assert_one_line(run_build(tmp_path, tmp_path / "out"), str(path), "not a readable parquet file")


def test_damaged_row_group_is_one_line(tmp_path):
    """Pages of the last row groups zeroed (the footer intact, so the file opens): the build
    stops at that row group with one line naming file and row group."""
    [path, _] = layouts.write_hf_parquet(tmp_path, layouts.images(), row_group_rows=2)
    data = bytearray(path.read_bytes())
    footer_at = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    # same length: the footer's offsets still point in
    data[footer_at - 3000 : footer_at - 1000] = bytes(2000)
    path.write_bytes(bytes(data))
    assert_one_line(
        run_build(tmp_path, tmp_path / "out", "--commit-every", "1"),
        str(path),
        "row group",
        "damaged",
    )


def test_corrupt_gzip_stream_is_one_line(tmp_path):
    [first, _] = layouts.write_hf_targz(tmp_path, layouts.images())
    data = bytearray(first.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    first.write_bytes(bytes(data))
    assert_one_line(
        run_build(tmp_path, tmp_path / "out"), str(first), "corrupt or truncated gzip/tar stream"
    )
    first.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    assert_one_line(run_build(tmp_path, tmp_path / "out2"), str(first), "corrupt or truncated")


def test_targz_bad_names_are_listed_rejects(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val_images.tar.gz").write_bytes(
        layouts.targz_bytes(
            [
                ("ILSVRC2012_val_00000001_n01440764.JPEG", GOOD),
                ("ILSVRC2012_val_00000002_n99999999.JPEG", GOOD),
                ("nowind.JPEG", GOOD),
            ]
        )
    )
    result = CliRunner().invoke(
        app,
        [
            "build-lmdb",
            "--src",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--split",
            "val",
            "--size",
            "16",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    listed = {r["name"]: r["reason"] for r in read_manifest(tmp_path / "out" / "val-16").rejects}
    assert (
        "n99999999" in listed["ILSVRC2012_val_00000002_n99999999.JPEG"]
        and "no wnid" in listed["nowind.JPEG"]
    )
    assert read_manifest(tmp_path / "out" / "val-16").counts_per_class[0] == 1


def test_webdataset_bad_samples_are_listed_rejects(tmp_path):
    layouts.wds_tar(
        tmp_path / "imagenet1k-train-0000.tar",
        [
            [("good.jpg", GOOD), ("good.cls", b"3"), ("good.json", b"{}")],
            [("nocls.jpg", GOOD), ("nocls.json", b"{}")],
            [("two.jpg", GOOD), ("two.png", GOOD), ("two.cls", b"1")],
            [("word.jpg", GOOD), ("word.cls", b"three")],
            [("range.jpg", GOOD), ("range.cls", b"1000")],
            [("noimage.cls", b"1"), ("noimage.json", b"{}")],
            [("good.jpg", GOOD), ("good.cls", b"4")],  # the key again, not next to its first use
        ],
    )
    result = run_build(tmp_path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "out" / "train-16")
    assert manifest.count == 1 and manifest.counts_per_class[3] == 1
    reasons = [r["reason"] for r in manifest.rejects]
    names = [r["name"] for r in manifest.rejects]
    assert names == ["nocls.jpg", "two", "word.jpg", "range.jpg", "noimage", "good.jpg"]
    for reason, fragment in zip(
        reasons,
        ["no .cls", "2 images", "not an integer", "outside 0..999", "no image", "duplicate key"],
    ):
        assert fragment in reason, (reason, fragment)


def test_damaged_shard_is_one_line(tmp_path):
    path = layouts.wds_tar(
        tmp_path / "imagenet1k-train-0000.tar", [[("a.jpg", GOOD), ("a.cls", b"1")]] * 1
    )
    path.write_bytes(path.read_bytes()[:700])
    assert_one_line(run_build(tmp_path, tmp_path / "out"), str(path))


@pytest.mark.parametrize("content", [b"", b"junk"])
def test_unlabelled_generic_shards_are_one_line(tmp_path, content):
    layouts.wds_tar(tmp_path / "mine-train-0.tar", [[("flat.jpg", GOOD), ("flat.txt", content)]])
    assert_one_line(run_build(tmp_path, tmp_path / "out"), "without labels")

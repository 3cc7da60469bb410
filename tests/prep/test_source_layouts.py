"""Odd input layouts: every file is included or listed with its reason, loops and fifos neither
hang nor abort, empty classes are warned about, and damaged label files give one line."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import pytest
from typer.testing import CliRunner

from prep.build import BuildConfig, build
from prep.cli import app
from prep.labels import DEVKIT_ARCHIVE, DEVKIT_DIR, META_MAT, VAL_GROUND_TRUTH, SourceError
from prep.sources import NO_LABEL, open_source
from tests.conftest import jpeg_bytes, write_train_tar


def listing(source):
    return [(m.name, m.label, m.skip_reason) for m in source.members()]


def _class_folders(root, layout):
    for relative in layout:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(40, 50, seed=len(relative)))


def test_nested_subfolders_are_included_with_their_path(tmp_path):
    _class_folders(
        tmp_path / "train",
        ["n01/a.JPEG", "n01/extra/b.JPEG", "n01/extra/deeper/c.JPEG", "n02/d.JPEG"],
    )
    assert listing(open_source(tmp_path, "train")) == [
        ("a.JPEG", 0, ""),
        ("extra/b.JPEG", 0, ""),
        ("extra/deeper/c.JPEG", 0, ""),
        ("d.JPEG", 1, ""),
    ]


def test_links_loops_fifos_hidden_and_stray_entries_are_listed_not_fatal(tmp_path):
    train = tmp_path / "train"
    _class_folders(train, ["n01/a.JPEG", "n02/b.JPEG"])
    (train / "n01" / "self").symlink_to("self")  # a self-looping symlink
    (train / "n01" / "up").symlink_to("..")  # a folder loop back to train/
    # another class's folder: its images would count twice
    (train / "n01" / "other").symlink_to(train / "n02")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "e.JPEG").write_bytes(jpeg_bytes(40, 50))
    (train / "n01" / "linked").symlink_to(tmp_path / "elsewhere")  # a folder outside: followed
    (train / "n01" / "dangling.JPEG").symlink_to("nowhere.JPEG")
    os.mkfifo(train / "n01" / "pipe.JPEG")  # reading it would block forever
    (train / "n01" / ".DS_Store").write_bytes(b"junk")
    (train / "README.txt").write_text("not an image")
    (train / "loop").symlink_to("loop")  # at the split level too
    rows = {
        name: (label, reason) for name, label, reason in listing(open_source(tmp_path, "train"))
    }
    assert rows["a.JPEG"] == (0, "") and rows["b.JPEG"] == (1, "")
    assert rows["linked/e.JPEG"] == (0, "")
    assert "already included" in rows["other"][1] and "already included" in rows["up"][1]
    assert "Too many levels of symbolic links" in rows["self"][1]
    assert "No such file or directory" in rows["dangling.JPEG"][1]
    assert rows["pipe.JPEG"][1].startswith("not a regular file")
    assert rows[".DS_Store"][1].startswith("hidden")
    assert rows["README.txt"] == (NO_LABEL, "not inside a class folder")
    assert "Too many levels" in rows["loop"][1]
    out = tmp_path / "out"
    manifest = build(
        BuildConfig(tmp_path, out, "train", (32,), "msgpack", workers=1, quiet=True)
    ).manifests[32]
    assert (
        manifest.count == 3
        and len(manifest.rejects) == len(rows) - 3
        and {r["name"] for r in manifest.rejects} >= {"self", "pipe.JPEG", "loop", "README.txt"}
    )


def test_empty_class_tar_and_folder_are_warned_about(tmp_path):
    good = jpeg_bytes(40, 50)
    (tmp_path / "tar").mkdir()
    write_train_tar(
        tmp_path / "tar" / "ILSVRC2012_img_train.tar", {"n01": [("a.JPEG", good)], "n02": []}
    )
    _class_folders(tmp_path / "folders" / "train", ["n01/a.JPEG"])
    (tmp_path / "folders" / "train" / "n02").mkdir()
    for layout in ("tar", "folders"):
        result = CliRunner().invoke(
            app,
            [
                "build-msgpack",
                "--src",
                str(tmp_path / layout),
                "--out",
                str(tmp_path / f"out-{layout}"),
                "--size",
                "32",
                "--workers",
                "0",
                "-q",
            ],
        )
        assert result.exit_code == 0, result.output
        assert result.stderr.strip().splitlines() == [
            "prep: warning: 1 of 2 classes have no records: n02 (an empty class tar or folder, or "
            "every image in it rejected)"
        ]


def test_gnu_long_link_member_in_a_class_tar_is_fine(tmp_path):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("a.JPEG", "b.JPEG"):
            data = jpeg_bytes(40, 50)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo(name + ".link")
            link.type, link.linkname = tarfile.SYMTYPE, "long/" * 40 + name  # needs a 'K' member
            tar.addfile(link)
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar", "w") as outer:
        info = tarfile.TarInfo("n01.tar")
        info.size = len(inner.getvalue())
        outer.addfile(info, io.BytesIO(inner.getvalue()))
    assert listing(open_source(tmp_path, "train")) == [("a.JPEG", 0, ""), ("b.JPEG", 0, "")]


def test_damaged_class_tar_is_one_line(tmp_path):
    records = b"0 path=x\n"  # a pax record of length 0: the old scanner looped forever
    header = bytearray(512)
    header[:9], header[124:136], header[156:157] = b"PaxHeader", b"%011o\0" % len(records), b"x"
    header[100:108], header[136:148], header[257:265] = b"0000644\0", b"%011o\0" % 0, b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    inner = bytes(header) + records + bytes(512 - len(records)) + bytes(1024)
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar", "w") as outer:
        info = tarfile.TarInfo("n01.tar")
        info.size = len(inner)
        outer.addfile(info, io.BytesIO(inner))
    result = CliRunner().invoke(
        app,
        [
            "build-lmdb",
            "--src",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "32",
            "--workers",
            "0",
            "-q",
        ],
    )
    lines = result.stderr.strip().splitlines()
    assert (
        result.exit_code == 1
        and len(lines) == 1
        and "n01.tar: archive is damaged (bad pax record" in lines[0]
    )


# ------------------------------------------------------------------------------ label files


@pytest.fixture
def val_with_extracted_devkit(sample_src, tmp_path):
    """The sample's val tar beside an extracted devkit whose ground-truth file a test rewrites."""
    src, info = sample_src
    shutil.copy(src / "ILSVRC2012_img_val.tar", tmp_path)
    with tarfile.open(src / DEVKIT_ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    assert (tmp_path / DEVKIT_DIR / META_MAT).is_file()
    return tmp_path, info, tmp_path / DEVKIT_DIR / VAL_GROUND_TRUTH


def test_ground_truth_with_bom_and_crlf_reads(val_with_extracted_devkit):
    src, info, ground_truth = val_with_extracted_devkit
    ids = ground_truth.read_text().split()
    ground_truth.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(ids).encode() + b"\r\n\r\n")
    assert [label for _, label, _ in listing(open_source(src, "val"))] == list(info.val_labels)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"1\n2\nthree\n", ":3: expected an ILSVRC2012_ID, got 'three'"),
        # a blank line would shift every later label
        (b"1\n\n2\n", ":2: expected an ILSVRC2012_ID, got ''"),
        (b"1\n\xff\xfe\n", "not UTF-8"),
    ],
)
def test_bad_ground_truth_is_one_line(val_with_extracted_devkit, content, message):
    src, _, ground_truth = val_with_extracted_devkit
    ground_truth.write_bytes(content)
    with pytest.raises(SourceError, match=message):
        open_source(src, "val")
    result = CliRunner().invoke(
        app,
        [
            "build-msgpack",
            "--src",
            str(src),
            "--out",
            str(src / "out"),
            "--split",
            "val",
            "--size",
            "32",
            "-q",
        ],
    )
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def _kaggle_val(sample_src, tmp_path, rows: str, bom: bool = False):
    src, info = sample_src
    shutil.copy(src / "ILSVRC2012_img_val.tar", tmp_path)
    shutil.copy(src / "ILSVRC2012_img_train.tar", tmp_path)
    text = "ImageId,PredictionString\r\n" + rows
    (tmp_path / "LOC_val_solution.csv").write_bytes(
        (b"\xef\xbb\xbf" if bom else b"") + text.encode()
    )
    return info


def test_kaggle_csv_with_bom_and_crlf_reads(sample_src, tmp_path):
    info = _kaggle_val(sample_src, tmp_path, "", bom=True)
    rows = "".join(
        f"ILSVRC2012_val_{i:08d},{info.wnids[label]} 1 2 3 4\r\n"
        for i, label in enumerate(info.val_labels, start=1)
    )
    _kaggle_val(sample_src, tmp_path, rows, bom=True)
    assert [label for _, label, _ in listing(open_source(tmp_path, "val"))] == list(info.val_labels)


@pytest.mark.parametrize("prediction", ["", "   "])
def test_kaggle_csv_blank_prediction_is_one_line(sample_src, tmp_path, prediction):
    info = _kaggle_val(sample_src, tmp_path, "")
    _kaggle_val(
        sample_src,
        tmp_path,
        f"ILSVRC2012_val_00000001,{info.wnids[0]} 1 2 3 4\r\n"
        f"ILSVRC2012_val_00000002,{prediction}\r\n",
    )
    with pytest.raises(
        SourceError, match=r"LOC_val_solution.csv:3: no prediction for 'ILSVRC2012_val_00000002'"
    ):
        open_source(tmp_path, "val")

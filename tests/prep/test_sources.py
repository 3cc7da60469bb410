"""prep.sources: every raw layout yields the right (name, label) members in a fixed order; bad
layouts fail with one clear message."""

from __future__ import annotations

import shutil
import tarfile

import pytest

from prep.labels import SourceError, class_index
from prep.sources import NO_LABEL, open_source
from tests.conftest import jpeg_bytes, write_train_tar


def members(source):
    return [(m.name, m.label) for m in source.members()]


def test_class_index_is_sorted_wnids():
    assert class_index(["n3", "n1", "n2", "n1"]) == {"n1": 0, "n2": 1, "n3": 2}


def test_train_tar_of_tars(sample_src):
    src, info = sample_src
    source = open_source(src, "train")
    assert source.layout == "train-tar" and source.classes == list(info.wnids)
    assert [name.split(",")[0] for name in source.class_names] == list(info.class_names)
    listed = members(source)
    assert len(listed) == info.num_classes * info.train_per_class
    for name, label in listed:  # member <wnid>_N.JPEG sits in <wnid>.tar: label = sorted position
        assert info.wnids[label] == name.split("_")[0]
    assert [label for _, label in listed] == sorted(label for _, label in listed)
    iterator = source.members()
    first = next(iterator)
    assert first.read()[:3] == b"\xff\xd8\xff" and first.nbytes == len(first.read())


def test_val_tar_labels_come_from_devkit_ids_not_sorted_order(sample_src):
    src, info = sample_src
    assert list(info.ilsvrc_ids) != sorted(info.ilsvrc_ids)  # the trap this guards against
    listed = members(open_source(src, "val"))
    assert [name for name, _ in listed] == [
        f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(listed) + 1)
    ]
    assert [label for _, label in listed] == list(info.val_labels)


def test_val_without_labels_is_an_error(sample_src, tmp_path):
    src, _ = sample_src
    shutil.copy(src / "ILSVRC2012_img_val.tar", tmp_path)
    with pytest.raises(SourceError, match="no validation labels"):
        open_source(tmp_path, "val")


def test_val_labels_from_kaggle_csv_and_plain_file(sample_src, tmp_path):
    src, info = sample_src
    shutil.copy(src / "ILSVRC2012_img_val.tar", tmp_path)
    shutil.copy(src / "ILSVRC2012_img_train.tar", tmp_path)  # classes come from train
    names = [f"ILSVRC2012_val_{i:08d}" for i in range(1, len(info.val_labels) + 1)]
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text(
        "ImageId,PredictionString\n"
        + "".join(
            f"{n},{info.wnids[label]} 1 2 3 4 {info.wnids[label]} 5 6 7 8\n"
            for n, label in zip(names, info.val_labels)
        )
    )
    assert [label for _, label in members(open_source(tmp_path, "val"))] == list(info.val_labels)
    kaggle.unlink()
    plain = tmp_path / "labels.txt"
    plain.write_text("".join(f"{n}.JPEG {label}\n" for n, label in zip(names, info.val_labels)))
    assert [label for _, label in members(open_source(tmp_path, "val", plain))] == list(
        info.val_labels
    )
    plain.write_text(
        "".join(f"{n} {info.wnids[label]}\n" for n, label in zip(names, info.val_labels))
    )
    assert [label for _, label in members(open_source(tmp_path, "val", plain))] == list(
        info.val_labels
    )
    plain.write_text("just-one-field\n")
    with pytest.raises(SourceError, match="expected `filename label`"):
        open_source(tmp_path, "val", plain)


def test_class_folders_for_both_splits(tmp_path):
    for split, per_class in (("train", 3), ("val", 2)):
        for wnid in ("n02000000", "n01000000"):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(40, 50, seed=i))
    (tmp_path / "train" / "n01000000" / ".hidden").write_bytes(b"x")
    train, val = open_source(tmp_path, "train"), open_source(tmp_path, "val")
    assert train.layout == val.layout == "folders" and train.classes == val.classes == [
        "n01000000",
        "n02000000",
    ]
    assert members(train)[:4] == [(".hidden", 0)] + [(f"n01000000_{i}.JPEG", 0) for i in range(3)]
    assert [m.skip_reason for m in train.members()][:2] == ["hidden file or folder: skipped", ""]
    assert len(members(val)) == 4 and members(val)[-1] == ("n02000000_1.JPEG", 1)


def test_val_folder_with_class_unknown_to_train(tmp_path):
    for split, wnid in (("train", "n01000000"), ("val", "n09999999")):
        (tmp_path / split / wnid).mkdir(parents=True)
        (tmp_path / split / wnid / "a.JPEG").write_bytes(jpeg_bytes(40, 50))
    with pytest.raises(SourceError, match="not among the 1 known classes"):
        open_source(tmp_path, "val")


def test_unlabelled_val_member_is_marked(sample_src, tmp_path):
    src, info = sample_src
    shutil.copy(src / "ILSVRC2012_img_train.tar", tmp_path)
    flat = tmp_path / "val"
    flat.mkdir()
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg_bytes(40, 50))
    (flat / "stray.JPEG").write_bytes(jpeg_bytes(40, 50))
    labels = tmp_path / "labels.txt"
    labels.write_text(f"ILSVRC2012_val_00000001.JPEG {info.wnids[1]}\n")
    source = open_source(tmp_path, "val", labels)
    assert source.layout == "flat-folder"
    assert members(source) == [("ILSVRC2012_val_00000001.JPEG", 1), ("stray.JPEG", NO_LABEL)]


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "no such directory"),
        ("empty", "no ImageNet train data"),
        ("not-a-tar", "not a readable tar archive"),
        ("flat-tar", "no per-class tars inside"),
    ],
)
def test_bad_layouts_fail_clearly(tmp_path, layout, message):
    src = tmp_path / "src"
    if layout != "missing":
        src.mkdir()
    if layout == "not-a-tar":
        (src / "ILSVRC2012_img_train.tar").write_bytes(b"\x00" * 100 + b"definitely not a tar")
    if layout == "flat-tar":
        with tarfile.open(src / "ILSVRC2012_img_train.tar", "w") as tar:
            tar.add(__file__, arcname="n01440764_1.JPEG")
    with pytest.raises(SourceError, match=message):
        open_source(src, "train")


def test_unknown_split(sample_src):
    with pytest.raises(SourceError, match="unknown split"):
        open_source(sample_src[0], "test")


def test_members_stream_without_reading_skipped_data(tmp_path):
    """Skipping a member costs a header read only: its data is never read unless asked for."""
    archive = write_train_tar(
        tmp_path / "ILSVRC2012_img_train.tar",
        {"n01000000": [(f"a{i}.JPEG", jpeg_bytes(30, 40, seed=i)) for i in range(5)]},
    )
    source = open_source(tmp_path, "train")
    read = {m.name: m.read() for m in source.members() if m.name == "a3.JPEG"}
    assert read == {"a3.JPEG": jpeg_bytes(30, 40, seed=3)}
    assert [m.name for m in source.members()] == [f"a{i}.JPEG" for i in range(5)]
    assert source.total_bytes == archive.stat().st_size


def test_truncated_archive_is_damaged_not_short(sample_src, tmp_path):
    src, _ = sample_src
    data = (src / "ILSVRC2012_img_train.tar").read_bytes()
    (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SourceError, match="archive is damaged .*truncated|runs past the end"):
        members(open_source(tmp_path, "train"))

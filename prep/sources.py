"""Raw ImageNet, read in place: (name, label, bytes) members in a fixed order.

Archives are never extracted. Tars are walked header by header (prep.tar_scan), seeking past data;
each member is described by where its bytes lie (file, offset, size), and only whoever needs them
reads them: the build's workers, in parallel. A resumed build skips what it already wrote at the
cost of header reads, and memory stays bounded whatever the archive's size. Order is fixed: class
tars and class folders in sorted-wnid order, members within a class tar in archive order, files
sorted by name. Mirrors of ImageNet (Hugging Face parquet and tar.gz, WebDataset shards) are
prep.mirrors'.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

from prep.folder_scan import FolderEntry, class_folders, walk_class_folders, walk_images
from prep.labels import (
    KAGGLE_SYNSET_MAPPING,
    KAGGLE_VAL_SOLUTION,
    Devkit,
    SourceError,
    class_index,
    image_key,
    read_label_file,
    read_synset_mapping,
)
from prep.mirrors import open_mirror
from prep.source_member import NO_LABEL, Source, SourceMember, file_identity
from prep.tar_scan import TarFormatError, scan_members

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
KAGGLE_DATA_DIR = Path("ILSVRC/Data/CLS-LOC")


SPARSE_REJECT = "sparse file in the archive (stored with its holes cut out): not supported"


def _tar_files(
    fd: int, name: str, start: int = 0, end: int | None = None
) -> Iterator[tuple[str, int, int, str]]:
    """(member name, data offset, size, reject reason or "") of regular files, in archive order."""
    try:
        for member in scan_members(fd, start, end):
            # str.rpartition, not Path(...).name: that costs ~5 us a member, on the sequential path
            yield (
                member.name.rpartition("/")[2],
                member.offset,
                member.size,
                SPARSE_REJECT if member.sparse else "",
            )
    except TarFormatError as err:
        if start == 0 and "at byte 0" in str(err):
            raise SourceError(f"{name}: not a readable tar archive ({err})") from None
        raise SourceError(f"{name}: archive is damaged ({err})") from None


def _list_class_tars(archive: Path) -> list[tuple[str, int, int]]:
    """(name, offset, size) of the per-class tars, sorted by name (= by wnid)."""
    with open(archive, "rb") as f:
        class_tars = [
            m[:3]
            for m in _tar_files(f.fileno(), str(archive))
            if m[0].endswith(".tar") and not m[3]
        ]
    if not class_tars:
        raise SourceError(f"{archive}: no per-class tars inside; is this ImageNet's train tar?")
    return sorted(class_tars)


def _train_tar_source(archive: Path, names: dict[str, str]) -> Source:
    class_tars = _list_class_tars(archive)
    labels = class_index(Path(name).stem for name, _, _ in class_tars)

    def class_members(
        class_name: str, class_offset: int, class_size: int
    ) -> Iterator[SourceMember]:
        label = labels[Path(class_name).stem]
        with open(archive, "rb") as f:
            for name, offset, size, reject in _tar_files(
                f.fileno(), f"{archive.name}:{class_name}", class_offset, class_offset + class_size
            ):
                yield SourceMember(name, label, str(archive), offset, size, reject)

    def segments() -> list:
        return [
            (size, functools.partial(class_members, name, offset, size))
            for name, offset, size in class_tars
        ]

    def members() -> Iterator[SourceMember]:
        for _, segment in segments():
            yield from segment()

    return Source(
        "train",
        "train-tar",
        sorted(labels),
        [names.get(w, "") for w in sorted(labels)],
        {"layout": "train-tar", "archive": file_identity(archive)},
        archive.stat().st_size,
        members,
        segments,
    )


def _val_tar_source(
    archive: Path,
    wnid_by_key: dict[str, str],
    classes: list[str],
    names: dict[str, str],
    labels_identity: dict,
) -> Source:
    labels = class_index(classes)

    def members() -> Iterator[SourceMember]:
        with open(archive, "rb") as f:
            for name, offset, size, reject in _tar_files(f.fileno(), str(archive)):
                label = labels.get(wnid_by_key.get(image_key(name), ""), NO_LABEL)
                yield SourceMember(name, label, str(archive), offset, size, reject)

    return Source(
        "val",
        "val-tar",
        sorted(labels),
        [names.get(w, "") for w in sorted(labels)],
        {"layout": "val-tar", "archive": file_identity(archive), "labels": labels_identity},
        archive.stat().st_size,
        members,
    )


def _folder_source(
    split: str,
    root: Path,
    class_dirs: list[str],
    known_classes: list[str],
    names: dict[str, str],
    strays: list[FolderEntry],
) -> Source:
    classes = known_classes or class_dirs
    labels = class_index(classes)
    unknown = sorted(set(class_dirs) - set(labels))
    if unknown:
        raise SourceError(
            f"{root}: class folders {unknown[:3]} are not among the {len(labels)} known classes"
        )
    walked = walk_class_folders(root, sorted(class_dirs))
    files = [(labels[c], entry) for c in sorted(class_dirs) for entry in walked[c]]
    files += [(NO_LABEL, entry) for entry in strays]

    def members() -> Iterator[SourceMember]:
        for label, entry in files:
            yield SourceMember(entry.name, label, entry.path, 0, entry.nbytes, entry.reject)

    total = sum(entry.nbytes for _, entry in files)
    return Source(
        split,
        "folders",
        sorted(labels),
        [names.get(w, "") for w in sorted(labels)],
        {"layout": "folders", "path": str(root.resolve()), "num_files": len(files), "bytes": total},
        total,
        members,
    )


def _flat_folder_source(
    root: Path,
    wnid_by_key: dict[str, str],
    classes: list[str],
    names: dict[str, str],
    labels_identity: dict,
) -> Source:
    labels = class_index(classes)
    files = walk_images(root)

    def members() -> Iterator[SourceMember]:
        for entry in files:
            label = labels.get(wnid_by_key.get(image_key(entry.name), ""), NO_LABEL)
            yield SourceMember(entry.name, label, entry.path, 0, entry.nbytes, entry.reject)

    total = sum(entry.nbytes for entry in files)
    return Source(
        "val",
        "flat-folder",
        sorted(labels),
        [names.get(w, "") for w in sorted(labels)],
        {
            "layout": "flat-folder",
            "path": str(root.resolve()),
            "num_files": len(files),
            "bytes": total,
            "labels": labels_identity,
        },
        total,
        members,
    )


def _split_dir(src_dir: Path, split: str) -> Path | None:
    for candidate in (src_dir / split, src_dir / KAGGLE_DATA_DIR / split):
        if candidate.is_dir():
            return candidate
    return None


def _subdirs(directory: Path) -> list[str]:
    return class_folders(directory)[0]


def _train_classes(src_dir: Path) -> list[str]:
    """The train split's classes, so val labels line up with train's when both are present."""
    if (src_dir / TRAIN_ARCHIVE).is_file():
        return [Path(name).stem for name, _, _ in _list_class_tars(src_dir / TRAIN_ARCHIVE)]
    train_dir = _split_dir(src_dir, "train")
    return _subdirs(train_dir) if train_dir else []


def _val_labels(
    src_dir: Path, val_labels: Path | None, devkit: Devkit | None, classes: list[str]
) -> tuple[dict[str, str], dict]:
    if val_labels is not None:
        return read_label_file(val_labels, classes), file_identity(val_labels)
    if devkit is not None:
        return devkit.val_wnids(), {"devkit": True}
    kaggle = src_dir / KAGGLE_VAL_SOLUTION
    if kaggle.is_file():
        return read_label_file(kaggle, classes), file_identity(kaggle)
    raise SourceError(
        f"{src_dir}: no validation labels: put ILSVRC2012_devkit_t12.tar.gz (or Kaggle's "
        f"{KAGGLE_VAL_SOLUTION}) in it, or pass --val-labels FILE"
    )


def open_source(src_dir: Path, split: str, val_labels: Path | None = None) -> Source:
    """Find ImageNet's `split` in src_dir: a mirror's files (Hugging Face parquet or tar.gz, also
    as an HF cache snapshot; WebDataset shards: prep.mirrors), the ILSVRC2012 tars (+ devkit for
    val), or class folders `<split>/<class>/*` (also Kaggle's ILSVRC/Data/CLS-LOC/<split>), or
    for val a flat folder with labels from the devkit, Kaggle's CSV or --val-labels."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise SourceError(f"{src_dir}: no such directory")
    if split not in ("train", "val"):
        raise SourceError(f"unknown split {split!r}: use train or val")
    archive = src_dir / (TRAIN_ARCHIVE if split == "train" else VAL_ARCHIVE)
    split_dir = _split_dir(src_dir, split)
    if not archive.is_file() and split_dir is None:  # the official layouts come first
        mirror = open_mirror(src_dir, split)
        if mirror is not None:
            return mirror
    devkit = Devkit.find(src_dir)
    names = dict(devkit.names) if devkit else {}
    if (src_dir / KAGGLE_SYNSET_MAPPING).is_file():
        names.update(read_synset_mapping(src_dir / KAGGLE_SYNSET_MAPPING))
    if split == "train":
        if archive.is_file():
            return _train_tar_source(archive, names)
        class_dirs, strays = class_folders(split_dir) if split_dir else ([], [])
        if class_dirs:
            return _folder_source("train", split_dir, class_dirs, [], names, strays)
        raise SourceError(
            f"{src_dir}: no ImageNet train data: expected {TRAIN_ARCHIVE} or train/<class>/*"
        )
    # Val classes: the devkit's, else train's, so that label i means the same class in both.
    classes = sorted(devkit.wnid_by_id.values()) if devkit else _train_classes(src_dir)
    if split_dir and _subdirs(split_dir):
        class_dirs, strays = class_folders(split_dir)
        return _folder_source("val", split_dir, class_dirs, classes, names, strays)
    if not archive.is_file() and not (
        split_dir and any(not e.reject for e in walk_images(split_dir))
    ):
        raise SourceError(f"{src_dir}: no ImageNet val data: expected {VAL_ARCHIVE} or val/")
    wnid_by_key, labels_identity = _val_labels(src_dir, val_labels, devkit, classes)
    classes = classes or sorted(set(wnid_by_key.values()))
    unknown = set(wnid_by_key.values()) - set(classes)
    if unknown:
        raise SourceError(
            f"val labels name {len(unknown)} classes unknown to train/devkit, e.g. "
            f"{sorted(unknown)[0]}"
        )
    if archive.is_file():
        return _val_tar_source(archive, wnid_by_key, classes, names, labels_identity)
    return _flat_folder_source(split_dir, wnid_by_key, classes, names, labels_identity)

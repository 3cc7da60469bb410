"""WebDataset shards, read in place: timm's `imagenet-1k-wds` and users' own shards.

A sample is the run of consecutive tar members sharing a key: the member name up to the first
dot of its base name (webdataset's own rule), e.g. `n01440764_10026.jpg` + `.cls` + `.json`.
timm's ImageNet shards are `imagenet1k-{train,validation}-NNNN.tar`; their card says they were
converted from TFDS's imagenet2012, whose ClassLabel is its sorted-wnid labels file, so `.cls` is
our class index as it is (checked: an integer in 0..999, else a listed reject). Other shards
(`*train*.tar`, `*val*.tar`) are labelled by `.cls` when their samples carry one, else by the
class folder in the key (`<class>/<name>.jpg`); classes are then their sorted class names, or
for `.cls` the integers 0..max seen.

Shards are plain tars, so they are read as the official train tar is: headers only
(prep.tar_scan), each image described by where its bytes lie, read by the workers. Only `.cls`
(a few bytes) is read here. Every sample is one member: its image, or a listed reject (no
image, two images, no or non-integer .cls, a key seen before in the shard).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Iterator

from prep.imagenet_classes import imagenet_wnids, label_reject
from prep.labels import SourceError
from prep.source_member import NO_LABEL, Source, SourceMember, files_source
from prep.tar_scan import TarFormatError, scan_members

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_CLS_BYTES = 64  # an integer and a newline; more is not a label
TIMM_SPLITS = {"train": "train", "val": "validation"}


@dataclasses.dataclass
class Sample:
    key: str
    # extension -> (offset, size)
    files: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    repeated: str = ""  # an extension seen twice in this sample


def split_key(name: str) -> tuple[str, str]:
    """(key, extension): `dir/n0144_1.jpg` -> (`dir/n0144_1`, `jpg`); the extension is
    everything after the first dot of the base name, lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def timm_shards(src_dir: Path, split: str) -> list[Path]:
    pattern = re.compile(rf"imagenet1k-{TIMM_SPLITS[split]}-(\d+)\.tar")
    return sorted(
        p for p in src_dir.glob("imagenet1k-*.tar") if pattern.fullmatch(p.name) and p.is_file()
    )


def generic_shards(src_dir: Path, split: str) -> list[Path]:
    words = ("train",) if split == "train" else ("val", "validation")
    found = []
    for path in sorted(src_dir.glob("*.tar")):
        tokens = re.split(r"[^a-z0-9]+", path.stem.lower())
        if (
            path.is_file()
            and any(word in tokens for word in words)
            and not path.name.startswith("ILSVRC2012_")
        ):
            found.append(path)
    return found


def samples(shard: Path) -> Iterator[Sample]:
    """The shard's samples, in order (damage in the tar: one SourceError)."""
    current = None
    try:
        with open(shard, "rb") as f:
            for member in scan_members(f.fileno()):
                key, extension = split_key(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key)
                if extension in current.files:
                    current.repeated = extension
                current.files[extension] = (member.offset, member.size)
    except TarFormatError as err:
        raise SourceError(f"{shard}: damaged tar ({err})") from None
    if current is not None:
        yield current


def read_cls(fd: int, span: tuple[int, int]) -> int | str:
    """The sample's integer label, or why it has none."""
    offset, size = span
    if size > MAX_CLS_BYTES:
        return f".cls of {size} bytes is not an integer label"
    text = os.pread(fd, size, offset)
    try:
        return int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return f".cls is not an integer: {text[:20]!r}"


def _sample_member(shard: Path, fd: int, sample: Sample, seen: set, label_of) -> SourceMember:
    images = [ext for ext in sample.files if ext in IMAGE_EXTENSIONS]
    name = f"{sample.key}.{images[0]}" if len(images) == 1 else sample.key
    offset, size = sample.files[images[0]] if len(images) == 1 else (0, 0)
    if sample.key in seen:
        reject = (
            f"duplicate key {sample.key!r}: a sample with that key came earlier in {shard.name}"
        )
    elif sample.repeated:
        reject = f"two .{sample.repeated} files under one key"
    elif not images:
        reject = (
            f"sample has no image (.{', .'.join(IMAGE_EXTENSIONS)}), only {sorted(sample.files)}"
        )
    elif len(images) > 1:
        extensions = ", ".join("." + e for e in images)
        reject = f"sample has {len(images)} images ({extensions}): which one is meant is unclear"
    else:
        reject = ""
    seen.add(sample.key)
    label = NO_LABEL
    if not reject:
        label = label_of(fd, sample)
        if isinstance(label, str):
            label, reject = NO_LABEL, label
    return SourceMember(name, label, str(shard), offset, size, reject)


def _shard_members(shard: Path, label_of) -> Iterator[SourceMember]:
    # per shard: bounded memory, and a part (whole shards) sees what a full build sees
    seen: set = set()
    fd = os.open(shard, os.O_RDONLY)
    try:
        for sample in samples(shard):
            yield _sample_member(shard, fd, sample, seen, label_of)
    finally:
        os.close(fd)


def _cls_label(checked: bool):
    def label_of(fd: int, sample: Sample) -> int | str:
        if "cls" not in sample.files:
            return "sample has no .cls label"
        label = read_cls(fd, sample.files["cls"])
        if isinstance(label, int) and checked and label_reject(label):
            return label_reject(label)
        return label if isinstance(label, str) or label >= 0 else f"negative label {label}"

    return label_of


def _key_class(key: str) -> str:
    return key.rpartition("/")[0].rpartition("/")[2]


def _source(split: str, layout: str, shards: list[Path], classes: list[str], label_of) -> Source:
    return files_source(
        split,
        layout,
        classes,
        [""] * len(classes),
        shards,
        functools.partial(_shard_members, label_of=label_of),
    )


def timm_source(split: str, shards: list[Path]) -> Source:
    return _source(split, "wds-imagenet1k", shards, imagenet_wnids(), _cls_label(checked=True))


def generic_source(split: str, shards: list[Path]) -> Source:
    """Users' shards: one header pass first, to learn how they are labelled and their classes."""
    with_cls, max_label, class_names = 0, -1, set()
    for shard in shards:
        with open(shard, "rb") as f:
            for sample in samples(shard):
                if "cls" in sample.files:
                    with_cls += 1
                    label = read_cls(f.fileno(), sample.files["cls"])
                    max_label = max(max_label, label) if isinstance(label, int) else max_label
                elif _key_class(sample.key):
                    class_names.add(_key_class(sample.key))
    if with_cls:
        classes = [str(i) for i in range(max_label + 1)]
        return _source(split, "wds", shards, classes, _cls_label(checked=False))
    if not class_names:
        raise SourceError(
            f"{shards[0].parent}: WebDataset shards without labels: samples need a .cls "
            "or a class folder in their key (<class>/<name>.jpg)"
        )
    labels = {name: index for index, name in enumerate(sorted(class_names))}

    def label_of(fd: int, sample: Sample) -> int | str:
        return labels.get(_key_class(sample.key), "no .cls and no <class>/ in the key")

    return _source(split, "wds", shards, sorted(class_names), label_of)

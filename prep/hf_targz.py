"""Hugging Face `ILSVRC/imagenet-1k`, older revision: `data/train_images_{0..4}.tar.gz`,
`data/val_images.tar.gz` (and test_images.tar.gz, unlabelled), read in place as streams.

Members are `<image id>_<wnid>.JPEG` (the loading script: "image filepath format:
<IMAGE_FILENAME>_<SYNSET_ID>.JPEG"; it takes the wnid after the last underscore and labels it by
its position in IMAGENET2012_CLASSES, sorted-wnid order). We do the same through
prep.imagenet_classes; a wnid outside the 1000 is a listed reject.

gzip cannot be seeked, so the main process decompresses each archive once, front to back
(gzip.GzipFile: CRC and length checked at every member's end), and walks it with tarfile's
stream mode; each member's bytes are read once and shipped to a worker. Memory: one member.
Progress and parts count compressed bytes: a member's share is how much further the compressed
file was read by the end of its data (deterministic for one Python version: all ranks of a
build run the same). A part still decompresses its archive from the start up to its range.
"""

from __future__ import annotations

import functools
import gzip
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from prep.imagenet_classes import imagenet_wnids
from prep.labels import SourceError, class_index
from prep.source_member import NO_LABEL, Source, SourceMember, files_source

MAX_IMAGE_BYTES = 256 << 20  # no real photo is near this: a larger member is refused unread
_STREAM_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)


def archives_for(data_dir: Path, split: str) -> list[Path]:
    """The split's archives, train_images_0 .. _4 in number order."""
    if split == "val":
        path = data_dir / "val_images.tar.gz"
        return [path] if path.is_file() else []
    numbered = [
        (int(m.group(1)), p)
        for p in data_dir.glob("train_images_*.tar.gz")
        if (m := re.fullmatch(r"train_images_(\d+)\.tar\.gz", p.name)) and p.is_file()
    ]
    return [p for _, p in sorted(numbered)]


def wnid_label(name: str, labels: dict[str, int]) -> tuple[int, str]:
    """(label, reject reason) for `<image id>_<wnid>.JPEG`."""
    stem = name.rpartition("/")[2].rsplit(".", 1)[0]
    wnid = stem.rpartition("_")[2] if "_" in stem else ""
    if wnid in labels:
        return labels[wnid], ""
    if not wnid:
        return NO_LABEL, "no wnid in the name (expected <image id>_<wnid>.JPEG)"
    return NO_LABEL, f"wnid {wnid[:40]!r} is not one of ImageNet-1k's 1000 classes"


def _archive_members(archive: Path, labels: dict[str, int]) -> Iterator[SourceMember]:
    done = 0
    last_byte = archive.stat().st_size - 1
    with open(archive, "rb") as raw:
        consumed = 0  # compressed bytes already attributed to earlier members
        try:
            with (
                gzip.GzipFile(fileobj=raw, mode="rb") as stream,
                tarfile.open(fileobj=stream, mode="r|") as tar,
            ):
                for info in tar:
                    if not info.isfile():
                        continue
                    label, reject = wnid_label(info.name, labels)
                    data = None
                    if info.size > MAX_IMAGE_BYTES:
                        reject = f"member of {info.size:,} bytes: too large to be an image"
                    elif not reject:
                        data = tar.extractfile(info).read()
                        if len(data) != info.size:
                            raise EOFError(f"member {info.name!r} ends early")
                    # kept inside the archive's byte range, so a part covering its last byte
                    # gets the members read along with the end of the file
                    position = min(raw.tell(), last_byte)
                    share, consumed = position - consumed, position
                    done += 1
                    yield SourceMember(
                        info.name, label, str(archive), info.offset_data, share, reject, data
                    )
        except _STREAM_ERRORS as err:
            detail = " ".join(str(err).split())[:200] or type(err).__name__
            raise SourceError(
                f"{archive}: corrupt or truncated gzip/tar stream after {done} members ({detail})"
            ) from None


def targz_source(split: str, archives: list[Path]) -> Source:
    labels = class_index(imagenet_wnids())
    return files_source(
        split,
        "hf-targz",
        imagenet_wnids(),
        [""] * len(labels),
        archives,
        functools.partial(_archive_members, labels=labels),
    )

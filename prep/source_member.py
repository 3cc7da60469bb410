"""What every source reader yields: SourceMember (one image, where its bytes are) and Source
(a split of a dataset: its classes, identity and members in a fixed order). Shared by the
official-layout readers (prep.sources) and the mirror readers (prep.mirrors)."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Iterator

NO_LABEL = -1


@dataclasses.dataclass(frozen=True)
class SourceMember:
    """One image of the source. Its bytes are `nbytes` at `offset` in the plain file `path` (an
    archive or the image file itself), so a worker process can read them without the main
    process ever touching image data."""

    name: str  # file name inside its archive or folder, e.g. n01440764_10026.JPEG
    label: int  # sorted-wnid class index, or NO_LABEL when the source has none for it
    path: str
    offset: int
    nbytes: int
    reject: str = ""  # why the source already knows this member cannot be an image, if it does
    # The bytes themselves, for sources whose images lie in no plain span of a file (gzip
    # streams, parquet pages): read once in the main process and shipped to a worker. Then
    # `nbytes` is the member's share of the source's stored bytes (progress, parts), and
    # path/offset say where it came from.
    data: bytes | None = None

    def read(self) -> bytes:
        return (
            self.data if self.data is not None else read_span(self.path, self.offset, self.nbytes)
        )

    @property
    def skip_reason(self) -> str:
        """Why this member is listed as a reject without being read ("" for a candidate image)."""
        if self.reject:
            return self.reject
        return "no label for this image in the validation labels" if self.label == NO_LABEL else ""


def read_span(path: str, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), nbytes, offset)
    if len(data) != nbytes:
        raise OSError(
            f"{path}: short read at {offset} ({len(data)} of {nbytes} bytes; file changed?)"
        )
    return data


@dataclasses.dataclass(frozen=True)
class Source:
    split: str
    layout: (
        str  # train-tar, val-tar, folders, flat-folder, hf-parquet, hf-targz, wds-imagenet1k, wds
    )
    classes: list[str]  # wnids (or folder names) in label order
    class_names: list[str]
    identity: dict  # what was read: a resumed build refuses to continue on a changed source
    total_bytes: int  # for the progress bar's ETA
    members: Callable[[], Iterator[SourceMember]]
    # The members again, as consecutive (bytes, members) spans in the same order, whose bytes
    # are known without reading a member header (the train tar's class tars), so one part of a
    # build can skip whole spans; None: one span of total_bytes (prep.parts).
    segments: Callable[[], list[tuple[int, Callable[[], Iterator[SourceMember]]]]] | None = None
    # (name, label, skip reason) of every member without reading image bytes, where the layout
    # can do that cheaper than members() (parquet: two small columns); None: from members().
    listing: Callable[[], Iterator[tuple[str, int, str]]] | None = None


def file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def files_source(
    split: str,
    layout: str,
    classes: list[str],
    class_names: list[str],
    files: list[Path],
    members_of: Callable[[Path], Iterator[SourceMember]],
) -> Source:
    """A source read file after file (archives, shards): each file is one segment of its size,
    so a part skips the files before its range unread."""
    sizes = [file.stat().st_size for file in files]

    def segments() -> list:
        return [(size, functools.partial(members_of, file)) for file, size in zip(files, sizes)]

    def members() -> Iterator[SourceMember]:
        for _, segment in segments():
            yield from segment()

    return Source(
        split,
        layout,
        classes,
        class_names,
        {"layout": layout, "files": [{"name": file.name, **file_identity(file)} for file in files]},
        sum(sizes),
        members,
        segments,
    )

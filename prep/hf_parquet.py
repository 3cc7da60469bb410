"""Hugging Face `ILSVRC/imagenet-1k` as parquet (the hub's current revision), read in place.

Files `data/{train,validation}-NNNNN-of-NNNNN.parquet`, columns `image` (struct of `bytes`,
`path`) and `label` (int64; -1 on test). The labels are ClassLabel indices into the loading
script's IMAGENET2012_CLASSES, which is in sorted-wnid order (prep.imagenet_classes), so they
are our class indices as they are; a file whose `huggingface` schema metadata lists another
number of label names is refused. Read with pyarrow (the `shardtrain[hf]` extra): it is
parquet's reference reader, and only what pyarrow does well is used: row group by row group,
`image` and `label` columns only, turned into Python bytes a row at a time (memory: one row
group's column chunk, whatever the file). Image bytes travel to the workers in the member
(`SourceMember.data`); letting each worker read its rows' row groups cost more (BENCHMARKS.md).

Parts and progress count the stored bytes of each row group (parquet metadata, no data read),
shared evenly among its rows, so every rank cuts the same parts without reading a row.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterator

from prep.imagenet_classes import NUM_IMAGENET_CLASSES, imagenet_wnids, label_reject
from prep.labels import SourceError
from prep.source_member import NO_LABEL, Source, SourceMember, file_identity

EXTRA_HINT = "reading Hugging Face parquet needs pyarrow: pip install 'shardtrain[hf]'"
BATCH_ROWS = 16  # rows converted from a row group at a time
MAX_IMAGE_BYTES = 256 << 20  # no real photo is near this; a larger cell is damage
# Row groups up to this are read whole (HF's writers make ~100-row or ~100 MB ones); larger
# ones page by page, so memory stays bounded whatever a user's writer chose.
MAX_WHOLE_ROW_GROUP_BYTES = 256 << 20
STREAM_BUFFER_BYTES = 1 << 20


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(EXTRA_HINT) from None
    return pq


def _errors() -> tuple:
    import pyarrow

    return (pyarrow.ArrowException, OSError, ValueError, EOFError, MemoryError)


def _open(path: Path, streamed: bool = False):
    """Unstreamed, pyarrow reads a row group's column chunk whole (its size is the footer's,
    checked against the file) and checks each page header against it; streamed, it reads page
    by page but allocates whatever a page header claims (a damaged one: gigabytes), so only row
    groups too large to hold are streamed."""
    pq = _pyarrow()
    try:
        return pq.ParquetFile(
            path, pre_buffer=False, buffer_size=STREAM_BUFFER_BYTES if streamed else 0
        )
    except _errors() as err:
        raise SourceError(f"{path}: not a readable parquet file ({_one_line(err)})") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def _label_names(path: Path, parquet) -> list[str]:
    """The ClassLabel names from the file's HF metadata ([] when it has none)."""
    metadata = parquet.schema_arrow.metadata or {}
    try:
        info = json.loads(metadata.get(b"huggingface", b"{}"))
        names = info.get("info", {}).get("features", {}).get("label", {}).get("names") or []
    except (ValueError, AttributeError):
        raise SourceError(
            f"{path}: unreadable Hugging Face metadata in the parquet schema"
        ) from None
    if names and len(names) != NUM_IMAGENET_CLASSES:
        raise SourceError(
            f"{path}: its label has {len(names)} classes, ImageNet-1k has "
            f"{NUM_IMAGENET_CLASSES}: not ImageNet-1k (or another label order)"
        )
    return [str(name) for name in names]


def _check_columns(path: Path, parquet) -> None:
    schema = parquet.schema_arrow
    image = schema.field("image").type if "image" in schema.names else None
    names = (
        [image.field(i).name for i in range(image.num_fields)]
        if hasattr(image, "num_fields")
        else []
    )
    if "bytes" not in names or "label" not in schema.names:
        raise SourceError(
            f"{path}: expected columns image (struct of bytes, path) and label, "
            f"found {schema.names}"
        )


def _row_group_bytes(metadata, index: int) -> int:
    group = metadata.row_group(index)
    return sum(group.column(c).total_compressed_size for c in range(group.num_columns))


def _rows(
    path: Path, group: int, nbytes: int, with_bytes: bool
) -> Iterator[tuple[str | None, bytes | None, int | None]]:
    """(path, bytes, label) of each row of one row group; a damaged one is one SourceError."""
    parquet = _open(path, streamed=nbytes > MAX_WHOLE_ROW_GROUP_BYTES)
    columns = ["image", "label"] if with_bytes else ["image.path", "label"]
    try:
        for batch in parquet.iter_batches(
            batch_size=BATCH_ROWS, row_groups=[group], columns=columns
        ):
            image = batch.column(0)
            paths = (
                image.field("path").to_pylist()
                if image.type.get_field_index("path") >= 0
                else [None] * len(batch)
            )
            images = image.field("bytes") if with_bytes else None
            for row, (name, label) in enumerate(zip(paths, batch.column(1).to_pylist())):
                # one Python copy of the image at a time, made as the build asks for it
                yield name, images[row].as_py() if with_bytes else None, label
    except _errors() as err:
        raise SourceError(f"{path}: row group {group} is damaged ({_one_line(err)})") from None
    finally:
        parquet.close()


def _member(
    file: Path,
    row: int,
    name: str | None,
    data: bytes | None,
    label,
    seen: set,
    nbytes: int,
    with_bytes: bool,
) -> SourceMember:
    name = name or f"{file.name}:{row}"  # a row without its original file name
    reject = ""
    if name in seen:
        reject = "duplicate name: an image of that name came earlier in its row group"
    elif label is None or not isinstance(label, int):
        reject = f"no integer label (got {label!r})"
    elif label == NO_LABEL:
        reject = "label -1: unlabelled (as in the test split)"
    else:
        reject = label_reject(label)
    if not reject and with_bytes and not data:
        reject = "no image bytes in this row"
    elif not reject and with_bytes and len(data) > MAX_IMAGE_BYTES:
        reject = f"image cell of {len(data):,} bytes: damaged"
    seen.add(name)
    return SourceMember(
        name,
        label if isinstance(label, int) and not reject else NO_LABEL,
        str(file),
        row,
        nbytes,
        reject,
        data if with_bytes and not reject else None,
    )


def _group_members(
    file: Path,
    group: int,
    first_row: int,
    num_rows: int,
    nbytes: int,
    seen: set,
    with_bytes: bool = True,
) -> Iterator[SourceMember]:
    row = first_row
    for count, (name, data, label) in enumerate(_rows(file, group, nbytes, with_bytes)):
        if count >= num_rows:
            raise SourceError(
                f"{file}: row group {group} holds more rows than its metadata says ({num_rows})"
            )
        share = nbytes * (count + 1) // num_rows - nbytes * count // num_rows
        yield _member(file, row, name, data, label, seen, share, with_bytes)
        row += 1
    if row - first_row != num_rows:
        raise SourceError(
            f"{file}: row group {group} is truncated ({row - first_row} of {num_rows} rows)"
        )


def _file_groups(file: Path) -> tuple[list[str], list[tuple]]:
    """(label names, (file, index, first row, rows, stored bytes) per row group) from the footer."""
    parquet = _open(file)
    try:
        _check_columns(file, parquet)
        names, metadata, row, groups = _label_names(file, parquet), parquet.metadata, 0, []
        for index in range(metadata.num_row_groups):
            num_rows, nbytes = metadata.row_group(index).num_rows, _row_group_bytes(metadata, index)
            if nbytes > file.stat().st_size or num_rows < 0:
                raise SourceError(
                    f"{file}: row group {index} claims {nbytes:,} bytes and {num_rows} rows "
                    f"in a file of {file.stat().st_size:,}: damaged"
                )
            groups.append((file, index, row, num_rows, nbytes))
            row += num_rows
        return names, groups
    except _errors() as err:
        raise SourceError(f"{file}: unreadable parquet metadata ({_one_line(err)})") from None
    finally:
        parquet.close()


def parquet_source(split: str, files: list[Path]) -> Source:
    """The split from its parquet files (in name order = the hub's order)."""
    groups, identity_files, names = [], [], []
    for file in files:
        file_names, file_groups = _file_groups(file)
        names, groups = names or file_names, groups + file_groups
        identity_files.append({"name": file.name, **file_identity(file)})

    def segments(with_bytes: bool = True) -> list:
        # duplicates are looked for within a row group: a part reads whole row groups, so a
        # parted build lists exactly the rejects a single build lists
        return [
            (group[4], functools.partial(_group_members, *group, set(), with_bytes))
            for group in groups
        ]

    def members() -> Iterator[SourceMember]:
        for _, segment in segments():
            yield from segment()

    def listing() -> Iterator[tuple[str, int, str]]:
        for _, segment in segments(with_bytes=False):
            for member in segment():
                yield member.name, member.label, member.skip_reason

    wnids = imagenet_wnids()
    return Source(
        split,
        "hf-parquet",
        wnids,
        names or [""] * len(wnids),
        {"layout": "hf-parquet", "files": identity_files},
        sum(g[4] for g in groups),
        members,
        segments,
        listing,
    )

"""Part I of N of a build: a contiguous range of the source's canonical member order.

Parts are cut by byte position, not by member count: member m's position is where its bytes
start in the source laid out in canonical order (the train tar's class tars one after another,
each member at its class tar's start plus the bytes of the members before it), and part I holds
the members whose position lies in [I*T/N, (I+1)*T/N) of the T bytes. That depends only on the
source, never on timing, so every node of a Slurm array (or torchrun rank) computes its share
alone; it balances the decode work, which follows bytes; and it needs no pass over every member
header to count them: a part skips whole class tars before its range and reads the headers of
at most the two class tars its range cuts. A part is a dataset directory of its own,
`<split>-<prep_size>.part-<i>-of-<n>/`, resumable and verifiable like any other; its manifest's
`build.part` says which bytes and how many members it holds, and `prep merge` joins the parts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from formats import split_dir_name
from prep.partial import BuildError
from prep.sources import Source, SourceMember


@dataclasses.dataclass(frozen=True)
class PartSpec:
    index: int
    num_parts: int

    def __post_init__(self):
        if self.num_parts < 1 or not 0 <= self.index < self.num_parts:
            raise BuildError(
                f"--part-index {self.index} --num-parts {self.num_parts}: "
                "need num-parts >= 1 and 0 <= part-index < num-parts"
            )


def byte_range(total_bytes: int, part: PartSpec) -> tuple[int, int]:
    """[start, stop) of the part's byte positions: N near-equal ranges tiling [0, total)."""
    return total_bytes * part.index // part.num_parts, total_bytes * (
        part.index + 1
    ) // part.num_parts


def part_dir_name(split: str, prep_size: int, part: PartSpec) -> str:
    """`train-160.part-03-of-16`: zero-padded, so the parts of one build sort in order."""
    width = len(str(part.num_parts))
    return f"{split_dir_name(split, prep_size)}.part-{part.index:0{width}d}-of-{part.num_parts}"


def _segments(source: Source) -> list[tuple[int, Callable[[], Iterator[SourceMember]]]]:
    return (
        source.segments() if source.segments is not None else [(source.total_bytes, source.members)]
    )


def members_in(segments: list, start: int, stop: int) -> Iterator[SourceMember]:
    """The members whose byte position lies in [start, stop), in order."""
    segment_start = 0
    for nbytes, members in segments:
        if segment_start < stop and segment_start + nbytes > start:  # else skipped unread
            position = segment_start
            for member in members():
                if position >= stop:
                    break
                if position >= start:
                    yield member
                position += member.nbytes
        segment_start += nbytes


def part_source(source: Source, part: PartSpec, shard_bytes: int | None) -> tuple[Source, dict]:
    """The source cut down to the part's members, and the part's description for its manifest
    (`num_members` is added once the part is built)."""
    segments = _segments(source)
    total = sum(nbytes for nbytes, _ in segments)
    start, stop = byte_range(total, part)
    info = {
        "index": part.index,
        "num_parts": part.num_parts,
        "bytes": [start, stop],
        "source_bytes": total,
        "shard_bytes": shard_bytes,
    }
    cut = dataclasses.replace(
        source,
        total_bytes=stop - start,
        segments=None,
        members=lambda: members_in(segments, start, stop),
    )
    return cut, info

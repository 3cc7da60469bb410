"""Part I of N of a build: a contiguous range of the source's canonical member order.

The range depends only on the number of source members, never on timing, so every node of a
Slurm array (or every torchrun rank) can compute its own share alone, and `prep merge` can join
the parts into the dataset one machine would have built. A part is a dataset directory of its
own, `<split>-<prep_size>.part-<i>-of-<n>/`, resumable and verifiable like any other; its
manifest's `build.part` says which members it holds.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from formats.layout import split_dir_name
from prep.partial import BuildError
from prep.sources import Source


@dataclasses.dataclass(frozen=True)
class PartSpec:
    index: int
    num_parts: int

    def __post_init__(self):
        if self.num_parts < 1 or not 0 <= self.index < self.num_parts:
            raise BuildError(f"--part-index {self.index} --num-parts {self.num_parts}: "
                             "need num-parts >= 1 and 0 <= part-index < num-parts")


def member_range(num_members: int, part: PartSpec) -> tuple[int, int]:
    """[start, stop) of the part's members: N near-equal contiguous ranges covering all."""
    return (num_members * part.index // part.num_parts,
            num_members * (part.index + 1) // part.num_parts)


def part_dir_name(split: str, prep_size: int, part: PartSpec) -> str:
    """`train-160.part-03-of-16`: zero-padded, so the parts of one build sort in order."""
    width = len(str(part.num_parts))
    return f"{split_dir_name(split, prep_size)}.part-{part.index:0{width}d}-of-{part.num_parts}"


def part_source(source: Source, part: PartSpec, shard_bytes: int | None) -> tuple[Source, dict]:
    """The source cut down to the part's members, and the part's description for its manifest.

    Counting the members takes one pass over the source's headers (no image data is read)."""
    sizes = np.fromiter((member.nbytes for member in source.members()), dtype=np.int64)
    if len(sizes) < part.num_parts:
        raise BuildError(f"--num-parts {part.num_parts}: the source has only {len(sizes)} members")
    start, stop = member_range(len(sizes), part)
    info = {"index": part.index, "num_parts": part.num_parts, "first_member": start,
            "num_members": stop - start, "source_members": len(sizes), "shard_bytes": shard_bytes}
    members = source.members
    cut = dataclasses.replace(source, total_bytes=int(sizes[start:stop].sum()),
                              members=lambda: itertools.islice(members(), start, stop))
    return cut, info

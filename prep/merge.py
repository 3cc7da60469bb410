"""`prep merge`: join the parts of one build into the dataset a single machine would have built.

Parts are checked before anything is written: all from the same source, split, prep_size,
quality, store and tool/codec versions, and together exactly the source's member order (no gap,
no overlap); and each against its own manifest, as `prep verify` checks a dataset short of
decoding (every file's digest, the record table, the names, the store's structure), so a part
damaged in copy or by a crashed node is refused, not laundered into a new manifest that vouches
for it. The record table so checked is the one copied, each record's crc32 is checked again as
it is copied (the part may change after its check), and the result gets the same whole-file
check before it is moved into place, so a damaged merge never replaces anything. Records are
streamed in part order into a new store with global indices,
through the same crash-safe partial-output protocol as a build (so a killed merge resumes), and
the record table, names, rejects and conversions are concatenated. The result equals a single
build of the same source and settings: the same records, keys, order, records.npy, names.txt
and manifest; LMDB's content digest is equal (its page layout, as after any resume, may not be)
and msgpack shards are byte-identical, since the writer rolls shards by the same rule over the
same records.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import time
from pathlib import Path

import lmdb
import numpy as np
from tqdm import tqdm

from formats import DatasetError
from formats.manifest import Manifest, load_records, read_manifest
from formats.msgpack_store import DEFAULT_SHARD_BYTES
from formats.record import FORMAT_VERSION, MANIFEST_FILE, NAMES_FILE, RECORD_DTYPE, checksum
from formats.store import open_reader
from prep.lock import lock_path, locked
from prep.partial import BuildError, PartialOutput, Progress
from prep.verify import check_whole_files

COMMIT_EVERY = 10_000  # records between durable commits of a merge (it only copies bytes)
# Every field that decides a dataset's bytes; parts must agree on all of them.
SAME_FIELDS = (
    "format_version",
    "store",
    "split",
    "prep_size",
    "quality",
    "upscale",
    "classes",
    "class_names",
    "source",
)
PER_PART_BUILD_KEYS = ("part", "num_stored_as_is")


@dataclasses.dataclass(frozen=True)
class Part:
    dataset_dir: Path
    manifest: Manifest
    info: dict  # the manifest's build.part: index, num_parts, first_member, num_members, ...
    records: np.ndarray | None = None  # its record table, once check_parts has checked it


@dataclasses.dataclass
class MergeSummary:
    dataset_dir: Path
    manifest: Manifest
    num_parts: int
    resumed_from: int  # records merged by an earlier, interrupted merge
    seconds: float


def _shared_build(manifest: Manifest) -> dict:
    return {k: v for k, v in manifest.build.items() if k not in PER_PART_BUILD_KEYS}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_parts(part_dirs: list[Path]) -> list[Part]:
    """The parts in member order, or BuildError (one line) if they are not one whole build."""
    if not part_dirs:
        raise BuildError("prep merge: no part directories given")
    parts = []
    for part_dir in map(Path, part_dirs):
        manifest = read_manifest(part_dir)
        info = manifest.build.get("part")
        if not isinstance(info, dict):
            raise BuildError(
                f"{part_dir}: not a part (its manifest has no build.part; built without "
                "--num-parts)"
            )
        parts.append(Part(part_dir, manifest, info))
    first = parts[0]
    # names.txt of older versions is written otherwise
    if first.manifest.format_version != FORMAT_VERSION:
        raise BuildError(
            f"{first.dataset_dir}: format_version {first.manifest.format_version}, this prep "
            f"writes {FORMAT_VERSION}: rebuild the parts with this version"
        )
    for part in parts[1:]:
        for field in SAME_FIELDS:
            mine, theirs = getattr(part.manifest, field), getattr(first.manifest, field)
            if mine != theirs:
                raise BuildError(
                    f"{part.dataset_dir}: {field} {_short(mine)} differs from "
                    f"{first.dataset_dir}'s {_short(theirs)}: parts of different builds"
                )
        if _shared_build(part.manifest) != _shared_build(first.manifest):
            raise BuildError(
                f"{part.dataset_dir}: built with other tool/codec versions or sizes than "
                f"{first.dataset_dir} ({_short(_shared_build(part.manifest))})"
            )
        for key in ("num_parts", "source_bytes", "shard_bytes"):
            if part.info.get(key) != first.info.get(key):
                raise BuildError(
                    f"{part.dataset_dir}: {key} {part.info.get(key)} differs from "
                    f"{first.dataset_dir}'s {first.info.get(key)}: parts of different builds"
                )
    return _in_member_order(parts)


def _in_member_order(parts: list[Part]) -> list[Part]:
    parts = sorted(parts, key=lambda p: (p.info["index"], str(p.dataset_dir)))
    num_parts = parts[0].info["num_parts"]
    for before, after in zip(parts, parts[1:]):
        if before.info["index"] == after.info["index"]:
            raise BuildError(
                f"overlap: part {after.info['index']} of {num_parts} given twice "
                f"({before.dataset_dir}, {after.dataset_dir})"
            )
    missing = sorted(set(range(num_parts)) - {p.info["index"] for p in parts})
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise BuildError(
            f"gap: part(s) {shown} of {num_parts} missing; give all {num_parts} part directories"
        )
    position = 0
    for part in parts:  # the indices are complete; their byte ranges must tile the source too
        start, stop = part.info["bytes"]
        if start != position:
            kind = "overlap" if start < position else "gap"
            raise BuildError(
                f"{kind}: {part.dataset_dir} starts at source byte {start}, "
                f"the parts before it end at {position}"
            )
        if part.manifest.count + len(part.manifest.rejects) != part.info["num_members"]:
            raise BuildError(
                f"{part.dataset_dir}: {part.manifest.count} records + {len(part.manifest.rejects)} "
                f"rejects, but the part read {part.info['num_members']} members"
            )
        position = stop
    if position != parts[0].info["source_bytes"]:
        raise BuildError(
            f"gap: the parts cover source bytes [0, {position}) of {parts[0].info['source_bytes']}"
        )
    return parts


def _part_check(part: Part) -> tuple[list[str], np.ndarray | None]:
    try:
        return check_whole_files(part.dataset_dir, part.manifest)
    except DatasetError as err:
        return [str(err)], None


def check_parts(parts: list[Part]) -> list[Part]:
    """Each part against its own manifest (digests hash in threads: hashlib releases the GIL),
    with its checked record table; or BuildError naming the first damaged part and its fault."""
    checked = []
    with concurrent.futures.ThreadPoolExecutor(min(len(parts), os.cpu_count() or 1)) as pool:
        for part, (faults, records) in zip(parts, pool.map(_part_check, parts)):
            if faults:
                more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
                raise BuildError(
                    f"{part.dataset_dir}: damaged part, nothing merged: {faults[0]}{more}; "
                    f"rebuild it (--part-index {part.info['index']} --num-parts "
                    f"{part.info['num_parts']}), `prep verify` lists every fault"
                )
            checked.append(dataclasses.replace(part, records=records))
    return checked


def _check_result(dataset_dir: Path, manifest: Manifest) -> None:
    faults = check_whole_files(dataset_dir, manifest)[0]
    if faults:
        raise BuildError(
            f"{dataset_dir}: the merged output fails its check ({faults[0]}); nothing was "
            "replaced, the parts are kept; rerun with --overwrite to merge again"
        )


def _fingerprint(parts: list[Part]) -> dict:
    digests = [
        hashlib.sha256((p.dataset_dir / MANIFEST_FILE).read_bytes()).hexdigest() for p in parts
    ]
    return {"merge_of": digests, "store": parts[0].manifest.store}


def _merged_fields(parts: list[Part], progress: Progress) -> dict:
    first = parts[0].manifest
    build = {**_shared_build(first), "num_stored_as_is": progress.stored_as_is[0]}
    return {
        "split": first.split,
        "quality": first.quality,
        "upscale": first.upscale,
        "classes": first.classes,
        "class_names": first.class_names,
        "source": first.source,
        "build": build,
    }


def merge(
    part_dirs: list[Path],
    out_dir: Path,
    overwrite: bool = False,
    quiet: bool = False,
    commit_every: int = COMMIT_EVERY,
) -> MergeSummary:
    """Join `part_dirs` (all parts of one build) into `<out_dir>/<split>-<prep_size>/`; the
    output is locked against builds and other merges of it, as a build's is."""
    started = time.perf_counter()
    parts = check_parts(load_parts(part_dirs))
    first = parts[0].manifest
    output = PartialOutput(
        Path(out_dir),
        first.split,
        first.prep_size,
        first.store,
        parts[0].info.get("shard_bytes") or DEFAULT_SHARD_BYTES,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with locked([(lock_path(Path(out_dir), output.final_dir.name), str(output.final_dir))]):
        return _merge_locked(parts, output, overwrite, quiet, commit_every, started)


def _merge_locked(
    parts: list[Part],
    output: PartialOutput,
    overwrite: bool,
    quiet: bool,
    commit_every: int,
    started: float,
) -> MergeSummary:
    out_dir = output.final_dir.parent
    if output.complete_if_finalized():  # an earlier merge was killed just before its last rename
        manifest = read_manifest(output.final_dir)
        return MergeSummary(output.final_dir, manifest, len(parts), manifest.count, 0.0)
    if (output.final_dir / MANIFEST_FILE).is_file() and not overwrite:
        raise BuildError(
            f"{output.final_dir}: exists; pass --overwrite to replace it with the merge"
        )
    fingerprint = _fingerprint(parts)
    progress = output.saved_progress(fingerprint, overwrite) or Progress(fingerprint)
    resumed_from = progress.num_records
    try:
        output.open(progress)
        if not progress.finished:
            _copy_records(parts, output, progress, quiet, commit_every)
        manifest = output.finalize(progress, _merged_fields(parts, progress), check=_check_result)
    except (OSError, lmdb.Error) as err:
        where = (
            f"{err.filename}: {err.strerror}"
            if isinstance(err, OSError) and err.filename
            else str(err)
        )
        raise BuildError(
            f"{where}; the unfinished merge in {out_dir} is kept: fix the cause "
            "and rerun the same command to resume"
        ) from None
    finally:
        output.close()
    return MergeSummary(
        output.final_dir, manifest, len(parts), resumed_from, time.perf_counter() - started
    )


def _copy_records(
    parts: list[Part], output: PartialOutput, progress: Progress, quiet: bool, commit_every: int
) -> None:
    total = sum(p.manifest.count for p in parts)
    if total == 0:
        raise BuildError(
            f"no {parts[0].manifest.split} images could be read "
            f"({sum(len(p.manifest.rejects) for p in parts)} rejected)"
        )
    bar = tqdm(
        total=total,
        initial=progress.num_records,
        unit="img",
        disable=quiet,
        dynamic_ncols=True,
        desc=f"merge {output.final_dir.name}",
    )
    offset = 0
    for part in parts:
        _copy_part(part, offset, output, progress, bar, commit_every)
        offset += part.manifest.count
    bar.close()
    progress.rejects = [r for p in parts for r in p.manifest.rejects]
    progress.conversions = [c for p in parts for c in p.manifest.conversions]
    progress.stored_as_is = [sum(p.manifest.build.get("num_stored_as_is", 0) for p in parts)]
    progress.consumed = sum(p.info["num_members"] for p in parts)
    progress.finished = True
    output.commit(progress)


def _copy_part(
    part: Part, offset: int, output: PartialOutput, progress: Progress, bar, commit_every: int
) -> None:
    """Append the part's records from where an earlier merge stopped, as global index offset + i."""
    count = part.manifest.count
    # done by an earlier, interrupted merge
    first = min(max(progress.num_records - offset, 0), count)
    records = (
        part.records if part.records is not None else load_records(part.dataset_dir, part.manifest)
    )
    labels, crcs = records["label"].tolist(), records["crc32"].tolist()
    rows, row_size = records.tobytes(), RECORD_DTYPE.itemsize
    reader = open_reader(part.dataset_dir, part.manifest)
    copied = first
    with open(part.dataset_dir / NAMES_FILE, "rb") as names:
        for index, name_line in zip(range(count), names):
            if index < first:
                continue
            data = reader.view(index)
            # changed since check_parts: never copy unchecked bytes
            if checksum(data) != crcs[index]:
                raise BuildError(
                    f"{part.dataset_dir}: record {index} changed while merging (checksum "
                    "mismatch); rerun once the part is stable"
                )
            output.append(
                offset + index,
                labels[index],
                data,
                rows[index * row_size : (index + 1) * row_size],
                name_line,
            )
            progress.num_records += 1
            progress.names_bytes += len(name_line)
            copied += 1
            if progress.num_records % commit_every == 0:
                output.commit(progress)
                bar.update(commit_every)
    reader.close()
    if copied != count:
        raise BuildError(f"{part.dataset_dir / NAMES_FILE}: {copied} names for {count} records")
    bar.update(max(offset + count - bar.n, 0))

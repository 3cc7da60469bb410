"""Build datasets: source members -> process pool (decode/resize/encode) -> one writer per output.

The main process reads the source and writes; workers only transform bytes. Results are consumed
in submission order with a bounded number of chunks in flight, so output order is the source
order (a resumed build equals an uninterrupted one) and memory stays flat whatever the source
size. Workers are forked before any store is opened (an LMDB environment must not cross a fork).
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import dataclasses
import os
import time
from pathlib import Path

import lmdb
from tqdm import tqdm

from formats import jpeg, split_dir_name
from formats.manifest import Manifest, read_manifest
from formats.msgpack_store import DEFAULT_SHARD_BYTES
from formats.names import escape_name, names_line
from formats.record import FORMAT_VERSION, RECORD_STRUCT
from prep.lock import lock_path, locked
from prep.partial import BuildError, PartialOutput, Progress
from prep.parts import PartSpec, part_dir_name, part_source
from prep.resize import RejectedImage, describe_error, prepare_image
from prep.sources import Source, open_source
from prep.workers import process_pool

TOOL_VERSION = "0.1.0"
CHUNK_IMAGES = 16  # per task: amortises IPC without making the ordered pipeline lumpy
CHUNKS_IN_FLIGHT_PER_WORKER = 4
COMMIT_SECONDS = 15.0


# More processes than this per core only add memory (each holds its codecs and buffers).
MAX_WORKERS_PER_CORE = 4
MAX_PREP_SIZE = jpeg.MAX_JPEG_SIDE


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def resolve_workers(requested: int | None) -> tuple[int, str | None]:
    """(workers to start, a warning or None) for a --workers value (None: one per core)."""
    cores = default_workers()
    if requested is None:
        return cores, None
    if requested < 0:
        raise BuildError(f"--workers {requested}: must be >= 0 (0 transforms in the main process)")
    cap = MAX_WORKERS_PER_CORE * cores
    if requested > cap:
        return cap, (
            f"--workers {requested} is more than {MAX_WORKERS_PER_CORE} per core "
            f"({cores} cores here): starting {cap}"
        )
    return requested, None


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    src_dir: Path
    out_dir: Path
    split: str
    prep_sizes: tuple[int, ...]
    store: str  # "lmdb" or "msgpack"
    quality: int = 90
    upscale: bool = False
    workers: int = dataclasses.field(default_factory=default_workers)
    strict: bool = False
    overwrite: bool = False
    val_labels: Path | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    # Records between durable commits: a kill loses at most this many, and an LMDB write
    # transaction holds its dirty pages in memory until commit, so this also bounds memory.
    commit_every: int = 1000
    quiet: bool = False
    reencode: bool = False  # re-encode even JPEGs already at size (default: store them as they are)
    part: PartSpec | None = None  # build only this part of the source (prep merge joins them)


@dataclasses.dataclass
class BuildSummary:
    manifests: dict[int, Manifest]  # prep_size -> manifest of the finished dataset
    skipped: list[int]  # sizes already complete (not rebuilt without --overwrite)
    resumed_from: int  # source members already done by an earlier, interrupted run
    consumed: int
    seconds: float
    workers: int
    codecs: dict
    # prep_size -> where it is
    dataset_dirs: dict[int, Path] = dataclasses.field(default_factory=dict)
    source_layout: str = (
        ""  # which layout --src was recognised as (train-tar, hf-parquet, wds, ...)
    )

    @property
    def images_per_second(self) -> float:
        return (self.consumed - self.resumed_from) / max(self.seconds, 1e-9)


# Per worker process: the file read last and its descriptor. An archive stays open for all of
# its members; a folder source moves to a new file every image, and keeping each one open would
# exhaust the process's descriptors (ulimit -n, often 1024) part-way through the build.
_open_file: list = [None, -1]


def _read_span(path: str, offset: int, nbytes: int) -> bytes:
    if _open_file[0] != path:
        if _open_file[1] >= 0:
            os.close(_open_file[1])
            _open_file[:] = [None, -1]  # closed, even if the next open fails
        _open_file[:] = [path, os.open(path, os.O_RDONLY)]
    data = os.pread(_open_file[1], nbytes, offset)
    if len(data) != nbytes:
        raise OSError(f"short read ({len(data)} of {nbytes} bytes; did the source change?)")
    return data


def _prepare_chunk(
    spans: list, prep_sizes: tuple, quality: int, upscale: bool, reencode: bool
) -> list:
    """Worker side: read each image's bytes where the source says they are (or take them as
    sent, from a streamed source), and transform them.

    Reading here rather than in the main process keeps image bytes out of inter-process pipes
    and leaves the main process little to do but write, so throughput scales with workers."""
    results = []
    for span in spans:
        try:  # a span, or the bytes themselves (a streamed source: gzip, parquet)
            data = span if isinstance(span, bytes) else _read_span(*span)
        except OSError as err:
            results.append(f"unreadable: {err.strerror or err}")
            continue
        try:
            results.append(prepare_image(data, prep_sizes, quality, upscale, reencode))
        except RejectedImage as rejected:
            results.append(rejected.reason)
        except Exception as err:  # whatever one member does, it is that member's reject
            results.append(f"cannot prepare: {describe_error(err)}")
    return results


def _warm_worker() -> str:
    return jpeg.codec_report()["turbojpeg"]


class _InlinePool:
    """--workers 0: transform in the main process (debugging, profiling)."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, cancel_futures: bool = False):
        pass


def _fingerprint(
    config: BuildConfig, source: Source, prep_sizes: tuple[int, ...], part_info: dict | None
) -> dict:
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "store": config.store,
        "split": config.split,
        "prep_sizes": list(prep_sizes),
        "quality": config.quality,
        "upscale": config.upscale,
        "shard_bytes": config.shard_bytes if config.store == "msgpack" else None,
        "source": source.identity,
    }
    if config.reencode:  # only when set: unfinished builds from before the flag still resume
        fingerprint["reencode"] = True
    if part_info is not None:
        fingerprint["part"] = part_info
    return fingerprint


def _manifest_fields(
    config: BuildConfig,
    source: Source,
    prep_sizes: tuple[int, ...],
    part_info: dict | None,
    progress: Progress,
) -> dict:
    build_info = {
        "tool_version": TOOL_VERSION,
        "codecs": jpeg.codec_report(),
        "built_with_sizes": list(prep_sizes),
        "decode": f"DCT-scaled (power of two) to cover {max(prep_sizes)} px, then bilinear resize",
        # False: baseline RGB JPEGs already at their stored size are kept byte for byte.
        "reencode_all": config.reencode,
    }
    if part_info is not None:
        build_info["part"] = {**part_info, "num_members": progress.consumed}
    return {
        "split": config.split,
        "quality": config.quality,
        "upscale": config.upscale,
        "classes": source.classes,
        "class_names": source.class_names,
        "source": source.identity,
        "build": build_info,
    }


def _output_fields(fields: dict, progress: Progress, position: int) -> dict:
    """One output's manifest fields: the shared ones plus its count of records stored as is."""
    return {
        **fields,
        "build": {**fields["build"], "num_stored_as_is": progress.stored_as_is[position]},
    }


def dataset_dir_of(config: BuildConfig, prep_size: int) -> Path:
    """Where the build puts the dataset of one prep_size (a part's own directory for a part)."""
    name = (
        split_dir_name(config.split, prep_size)
        if config.part is None
        else part_dir_name(config.split, prep_size, config.part)
    )
    return config.out_dir / name


def _outputs_to_build(config: BuildConfig) -> tuple[list[PartialOutput], list[int]]:
    todo, skipped = [], []
    for prep_size in dict.fromkeys(config.prep_sizes):
        output = PartialOutput(
            config.out_dir,
            config.split,
            prep_size,
            config.store,
            config.shard_bytes,
            dataset_dir_of(config, prep_size).name,
        )
        if not config.overwrite and (output.final_dir / "manifest.json").is_file():
            skipped.append(prep_size)
        elif not config.overwrite and output.complete_if_finalized():
            skipped.append(prep_size)
        else:
            todo.append(output)
    return todo, skipped


def build(config: BuildConfig) -> BuildSummary:
    _check_config(config)
    source = open_source(config.src_dir, config.split, config.val_labels)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    # a part locks its own
    dataset_dirs = [dataset_dir_of(config, size) for size in dict.fromkeys(config.prep_sizes)]
    with locked([(lock_path(config.out_dir, d.name), str(d)) for d in dataset_dirs]):
        return _build_locked(config, source)


def _build_locked(config: BuildConfig, source: Source) -> BuildSummary:
    """The build proper, with every output locked against other builds."""
    outputs, skipped = _outputs_to_build(config)
    started = time.perf_counter()
    if not outputs:
        return BuildSummary(
            {s: read_manifest(dataset_dir_of(config, s)) for s in skipped},
            skipped,
            0,
            0,
            0.0,
            config.workers,
            jpeg.codec_report(),
            {s: dataset_dir_of(config, s) for s in skipped},
            source.layout,
        )
    part_info = None
    if config.part is not None:
        source, part_info = part_source(
            source, config.part, config.shard_bytes if config.store == "msgpack" else None
        )
    prep_sizes = tuple(o.prep_size for o in outputs)
    fingerprint = _fingerprint(config, source, prep_sizes, part_info)
    saved = [o.saved_progress(fingerprint, config.overwrite) for o in outputs]
    # Outputs commit one after another, so a kill can leave them at different points: all
    # resume from the one furthest behind (records and rejects are the same for every size);
    # if any output has nothing saved, all start over.
    progress = min(saved, key=lambda p: p.consumed) if all(saved) else Progress(fingerprint)
    if not progress.stored_as_is:
        progress.stored_as_is = [0] * len(outputs)
    resumed_from = progress.consumed

    pool = _start_pool(config.workers)
    try:
        for output in outputs:
            output.open(progress)
        if not progress.finished:
            _run(config, source, outputs, progress, pool, prep_sizes)
        fields = _manifest_fields(config, source, prep_sizes, part_info, progress)
        manifests = {
            o.prep_size: o.finalize(progress, _output_fields(fields, progress, i))
            for i, o in enumerate(outputs)
        }
    except concurrent.futures.process.BrokenProcessPool:
        raise BuildError(
            f"a worker process died (out of memory? killed?); the unfinished build in "
            f"{config.out_dir} is kept: rerun the same command to resume"
        ) from None
    except (OSError, lmdb.Error) as err:  # a full disk, a vanished or unreadable file, ...
        where = (
            f"{err.filename}: {err.strerror}"
            if isinstance(err, OSError) and err.filename
            else str(err)
        )
        raise BuildError(
            f"{where}; the unfinished build in {config.out_dir} is kept: fix the cause "
            "and rerun the same command to resume"
        ) from None
    finally:
        pool.shutdown(cancel_futures=True)
        for output in outputs:
            output.close()
    for size in skipped:
        manifests[size] = read_manifest(dataset_dir_of(config, size))
    return BuildSummary(
        manifests,
        skipped,
        resumed_from,
        progress.consumed,
        time.perf_counter() - started,
        config.workers,
        jpeg.codec_report(),
        {s: dataset_dir_of(config, s) for s in manifests},
        source.layout,
    )


def _check_config(config: BuildConfig) -> None:
    """Every setting in range, or one line saying which is not (before anything is touched)."""
    if config.store not in ("lmdb", "msgpack"):
        raise BuildError(f"unknown store {config.store!r}")
    if not config.prep_sizes or not all(8 <= size <= MAX_PREP_SIZE for size in config.prep_sizes):
        raise BuildError(
            f"--size must be given, each 8..{MAX_PREP_SIZE} px (got {list(config.prep_sizes)})"
        )
    if not 1 <= config.quality <= 100:
        raise BuildError(f"--quality {config.quality}: must be 1..100")
    if config.workers < 0:
        raise BuildError(
            f"--workers {config.workers}: must be >= 0 (0 transforms in the main process)"
        )
    if config.commit_every < 1:
        raise BuildError(f"--commit-every {config.commit_every}: must be >= 1")
    # the CLI's --shard-mb is whole MiB (>= 1); the library takes any positive size (tests cut
    # shards of a few records to put shard boundaries inside tiny builds)
    if config.store == "msgpack" and config.shard_bytes < 1:
        raise BuildError(f"--shard-mb {config.shard_bytes / (1 << 20):g}: must be >= 1")


def _start_pool(workers: int):
    if workers <= 0:
        return _InlinePool()
    pool = process_pool(workers)
    # Spawn (and warm) every worker now, before any store is opened in this process.
    for future in [pool.submit(_warm_worker) for _ in range(workers)]:
        future.result()
    return pool


def _run(
    config: BuildConfig,
    source: Source,
    outputs: list[PartialOutput],
    progress: Progress,
    pool,
    prep_sizes: tuple[int, ...],
) -> None:
    bar = tqdm(
        total=source.total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"{config.split} {'+'.join(map(str, prep_sizes))}",
        disable=config.quiet,
        dynamic_ncols=True,
        smoothing=0.05,
    )
    pending: collections.deque = collections.deque()
    max_in_flight = max(1, config.workers) * CHUNKS_IN_FLIGHT_PER_WORKER
    state = {
        "committed_at": time.monotonic(),
        "records_at_commit": progress.num_records,
        "started": time.monotonic(),
        "done_here": 0,
    }

    def handle(members: list, future) -> None:
        results = iter(future.result())
        for name, label, nbytes, skip_reason in members:
            result = skip_reason or next(results)
            if isinstance(result, str):
                progress.rejects.append({"name": name, "reason": result})
                if config.strict:
                    raise BuildError(f"--strict: {escape_name(name)}: {result}")
            else:
                if result.conversion is not None:
                    progress.conversions.append({"name": name, "conversion": result.conversion})
                name_line = names_line(name)
                for position, (output, image) in enumerate(zip(outputs, result.outputs)):
                    progress.stored_as_is[position] += image.stored_as_is
                    row = RECORD_STRUCT.pack(
                        label,
                        image.height,
                        image.width,
                        result.orig_height,
                        result.orig_width,
                        image.crc32,
                    )
                    output.append(progress.num_records, label, image.jpeg, row, name_line)
                progress.num_records += 1
                progress.names_bytes += len(name_line)
            progress.consumed += 1
            state["done_here"] += 1
            bar.update(nbytes)
        now = time.monotonic()
        if (
            progress.num_records - state["records_at_commit"] >= config.commit_every
            or now - state["committed_at"] >= COMMIT_SECONDS
        ):
            for output in outputs:
                output.commit(progress)
            state["committed_at"], state["records_at_commit"] = now, progress.num_records
        rate = state["done_here"] / max(now - state["started"], 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} img/s, {len(progress.rejects)} rejected", refresh=False)

    def submit(chunk: list, spans: list) -> None:
        options = (prep_sizes, config.quality, config.upscale, config.reencode)
        pending.append((chunk, pool.submit(_prepare_chunk, spans, *options)))

    try:
        chunk: list = []
        spans: list = []
        for position, member in enumerate(source.members()):
            if position < progress.consumed:  # done by an earlier run: headers only, no data read
                bar.update(member.nbytes)
                continue
            skip_reason = member.skip_reason
            if not skip_reason:
                spans.append(
                    member.data
                    if member.data is not None
                    else (member.path, member.offset, member.nbytes)
                )
            chunk.append((member.name, member.label, member.nbytes, skip_reason))
            if len(chunk) == CHUNK_IMAGES:
                submit(chunk, spans)
                chunk, spans = [], []
                while len(pending) >= max_in_flight:
                    handle(*pending.popleft())
        if chunk:
            submit(chunk, spans)
        while pending:
            handle(*pending.popleft())
        if progress.num_records == 0 and config.part is None:  # a part may hold only rejects
            raise BuildError(
                f"{config.src_dir}: no {config.split} images could be read "
                f"({len(progress.rejects)} rejected)"
            )
        progress.finished = True
        for output in outputs:
            output.commit(progress)
    finally:
        bar.close()

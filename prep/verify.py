"""`prep verify`: re-read a dataset and check it against its manifest; the contract between
prep and train. Every fault is reported (the first ones in full); any fault means exit 1.

Whole-file checks (sha256 of every listed file, store structure, the record table, per-class
counts) run first; then every record is checked in parallel: crc32, a full decode, its size
against the table, the shorter side against prep_size (small originals excepted), and for
msgpack the stored index and label.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from formats import DatasetError, jpeg
from formats.lmdb_store import content_digest
from formats.manifest import Manifest, file_digest, load_names, load_records, read_manifest
from formats.msgpack_store import MsgpackReader, shard_file_name
from formats.names import escape_name
from formats.record import checksum
from formats.store import open_reader
from prep.resize import decode_rgb, target_dims
from prep.workers import process_pool

MAX_FAULTS_SHOWN = 20
FULL_SIZE = 1 << 30  # as decode_rgb's min_short_side: no DCT scale covers it, so none is used
RANGES_PER_WORKER = 8


@dataclasses.dataclass
class VerifyReport:
    dataset_dir: Path
    manifest: Manifest | None
    faults: list[str]
    records_checked: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.faults

    @property
    def records_per_second(self) -> float:
        return self.records_checked / max(self.seconds, 1e-9)


_worker_state: dict = {}


def _init_worker(dataset_dir: Path, manifest: Manifest, distrust: bool = False) -> None:
    """Once per worker process: the table is loaded here rather than pickled into every task.
    The names only serve fault messages: loaded at a worker's first fault, not up front (1.28M
    Python strings for ImageNet train, ~110 MB in every worker)."""
    _worker_state.update(
        dataset_dir=dataset_dir,
        manifest=manifest,
        distrust=distrust,
        records=load_records(dataset_dir, manifest),
        names=None,
    )


def _check_range(start: int, stop: int) -> tuple[int, list[str]]:
    dataset_dir, manifest = _worker_state["dataset_dir"], _worker_state["manifest"]
    records = _worker_state["records"]
    reader = open_reader(dataset_dir, manifest)
    tj = jpeg.turbo()
    faults = []

    def fault(index: int, problem: str) -> None:
        if _worker_state["names"] is None:
            _worker_state["names"] = load_names(dataset_dir, manifest)
        faults.append(f"record {index} ({escape_name(_worker_state['names'][index])}): {problem}")

    for index in range(start, stop):
        row = records[index]
        try:
            if isinstance(reader, MsgpackReader):
                stored_index, stored_label, data = reader.record(index)
                if stored_index != index or stored_label != int(row["label"]):
                    fault(
                        index,
                        f"stored as index {stored_index} label {stored_label}, "
                        f"table says {index} label {int(row['label'])}",
                    )
            else:
                data = reader.view(index)
        except DatasetError as err:
            fault(index, str(err))
            continue
        if checksum(data) != int(row["crc32"]):
            fault(index, "checksum mismatch (corrupt bytes)")
            continue
        try:
            pixels = _decode_stored(data, tj, row, _worker_state["distrust"])
        except Exception as err:  # any decoder failure is this record's fault, not ours
            fault(index, f"does not decode ({err})")
            continue
        height, width = pixels.shape[:2]
        if (height, width) != (int(row["height"]), int(row["width"])):
            fault(index, f"decodes to {height}x{width}, table says {row['height']}x{row['width']}")
        # target_dims is the builder's own rule, so the two cannot disagree.
        elif (height, width) != target_dims(
            int(row["orig_height"]), int(row["orig_width"]), manifest.prep_size, manifest.upscale
        ):
            fault(
                index,
                f"{height}x{width} does not fit prep_size {manifest.prep_size} "
                f"(original {row['orig_height']}x{row['orig_width']})",
            )
        if not 0 <= int(row["label"]) < manifest.num_classes:
            fault(index, f"label {int(row['label'])} outside [0, {manifest.num_classes})")
    reader.close()
    return stop - start, faults


def _decode_stored(data, tj, row, distrust: bool) -> np.ndarray:
    """A stored record at full size (any libjpeg warning is an error). When some file already
    failed its digest, the header's size is compared with the table first: a tampered record
    must not make this allocate whatever its header claims."""
    if tj is None or jpeg.sniff(data) != "jpeg":  # no libturbojpeg: PIL, at full size too
        return decode_rgb(data, FULL_SIZE)[0]
    if distrust:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bad header raises right after warning
            width, height = tj.decode_header(data)[:2]
        if (height, width) != (int(row["height"]), int(row["width"])):
            raise ValueError(f"its header says {height}x{width}")
    return jpeg.decode_turbo(data)


def _short(digest: dict) -> str:
    return ", ".join(f"{k} {str(v)[:12]}" for k, v in sorted(digest.items()))


def _check_files(dataset_dir: Path, manifest: Manifest) -> list[str]:
    faults = []
    for name, expected in sorted(manifest.files.items()):
        path = dataset_dir / name
        if not path.is_file():
            faults.append(f"{name}: missing")
            continue
        try:
            actual = (
                content_digest(dataset_dir) if "content_sha256" in expected else file_digest(path)
            )
        except DatasetError as err:
            faults.append(f"{name}: {err}")
            continue
        if actual != expected:
            faults.append(f"{name}: digest {_short(actual)}, manifest says {_short(expected)}")
    if manifest.store == "msgpack":
        listed = {n for n in manifest.files if n.startswith("shard-")}
        for extra in sorted(
            p.name for p in dataset_dir.glob("shard-*.msgpack") if p.name not in listed
        ):
            faults.append(f"{extra}: shard not in the manifest")
    return faults


def _check_table(manifest: Manifest, records: np.ndarray) -> list[str]:
    faults = []
    labels = records["label"]
    if len(labels) and (labels.min() < 0 or labels.max() >= manifest.num_classes):
        faults.append(f"record table has labels outside [0, {manifest.num_classes})")
    else:
        counts = np.bincount(labels, minlength=manifest.num_classes).tolist()
        if counts != manifest.counts_per_class:
            wrong = [c for c, (a, b) in enumerate(zip(counts, manifest.counts_per_class)) if a != b]
            faults.append(
                f"per-class counts differ from the manifest for {len(wrong)} classes, "
                f"e.g. class {wrong[0]}: {counts[wrong[0]]} vs "
                f"{manifest.counts_per_class[wrong[0]]}"
            )
    if sum(manifest.counts_per_class) != manifest.count:
        faults.append(
            f"manifest counts_per_class sum to {sum(manifest.counts_per_class)}, count is "
            f"{manifest.count}"
        )
    return faults


def _check_msgpack_shards(dataset_dir: Path, manifest: Manifest) -> list[str]:
    reader = MsgpackReader(dataset_dir, manifest.count)
    faults = []
    for shard, expected_bytes in sorted(reader.shard_sizes().items()):
        path = dataset_dir / shard_file_name(shard)
        actual = path.stat().st_size if path.exists() else 0
        if actual != expected_bytes:
            faults.append(
                f"{path.name}: {actual} bytes, index expects {expected_bytes} "
                f"({'truncated' if actual < expected_bytes else 'trailing data'})"
            )
    return faults


def check_source(
    manifest: Manifest, names: list[str], src_dir: Path, val_labels: Path | None
) -> list[str]:
    """Every source member is a record or a listed reject, per class as the manifest says."""
    from prep.sources import open_source  # only `verify --source` needs the raw archives

    source = open_source(src_dir, manifest.split, val_labels)
    members = collections.Counter()
    # names only: a layout that can list them without reading images does (parquet)
    listing = source.listing() if source.listing is not None else (m.name for m in source.members())
    for entry in listing:
        members[entry if isinstance(entry, str) else entry[0]] += 1
    built = collections.Counter(names) + collections.Counter(r["name"] for r in manifest.rejects)
    faults = []
    if members != built:
        missing, extra = members - built, built - members
        faults.append(
            f"source has {sum(members.values())} members, dataset accounts for "
            f"{sum(built.values())} (missing e.g. {sorted(missing)[:3]}, unknown e.g. "
            f"{sorted(extra)[:3]})"
        )
    if source.classes != manifest.classes:
        faults.append(
            f"source classes differ from the manifest's ({len(source.classes)} vs "
            f"{manifest.num_classes})"
        )
    return faults


def check_whole_files(dataset_dir: Path, manifest: Manifest) -> tuple[list[str], np.ndarray | None]:
    """verify's first tier, no decoding: every listed file against its digest, the record table
    and names, per-class counts, the store's structure. The faults, and the record table when
    the records can be checked one by one (None: they cannot). `prep merge` runs it on each
    part before merging, and on its result before moving it into place."""
    faults = _check_files(dataset_dir, manifest)
    try:
        records = load_records(dataset_dir, manifest)
        load_names(dataset_dir, manifest)  # checked now; kept only for --source, after the workers
    except DatasetError as err:
        return faults + [str(err)], None
    faults += _check_table(manifest, records)
    try:
        if manifest.store == "msgpack":
            faults += _check_msgpack_shards(dataset_dir, manifest)
        else:
            if manifest.count:  # opening the LMDB checks its record count, once, here
                open_reader(dataset_dir, manifest).view(0)
    except DatasetError as err:
        return faults + [str(err)], None
    return faults, records


def verify(
    dataset_dir: Path,
    workers: int,
    src_dir: Path | None = None,
    val_labels: Path | None = None,
    quiet: bool = False,
) -> VerifyReport:
    dataset_dir = Path(dataset_dir)
    started = time.perf_counter()
    manifest = read_manifest(dataset_dir)  # DatasetError: not a dataset at all
    faults, records = check_whole_files(dataset_dir, manifest)
    if records is None:
        return VerifyReport(dataset_dir, manifest, faults, 0, time.perf_counter() - started)
    checked = 0
    bounds = np.linspace(0, manifest.count, max(1, workers) * RANGES_PER_WORKER + 1).astype(int)
    ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    bar = tqdm(
        total=manifest.count,
        unit="img",
        desc=f"verify {dataset_dir.name}",
        disable=quiet,
        dynamic_ncols=True,
    )
    with process_pool(max(1, workers), _init_worker, (dataset_dir, manifest, bool(faults))) as pool:
        futures = [pool.submit(_check_range, a, b) for a, b in ranges]
        for future in futures:  # in order, so faults come out sorted by record
            count, range_faults = future.result()
            checked += count
            faults += range_faults
            bar.update(count)
    bar.close()
    if src_dir is not None:
        faults += check_source(manifest, load_names(dataset_dir, manifest), src_dir, val_labels)
    return VerifyReport(dataset_dir, manifest, faults, checked, time.perf_counter() - started)

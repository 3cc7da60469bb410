"""The manifest: the self-description of one dataset directory, written last.

No manifest, no dataset: writers create it only after every other file is complete and synced,
and readers refuse a directory without one or with an unknown format version. It holds no
timestamps, so a resumed build produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from formats import DatasetError, write_atomic
from formats.names import parse_names
from formats.record import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    NAMES_FILE,
    READABLE_FORMAT_VERSIONS,
    RECORD_DTYPE,
    RECORDS_FILE,
)

STORES = ("lmdb", "msgpack")
OPTIONAL_FIELDS = {"conversions"}  # may be missing from a manifest: written before they existed


@dataclasses.dataclass(frozen=True)
class Manifest:
    store: str  # "lmdb" or "msgpack"
    split: str
    prep_size: int  # shorter side of stored images (small originals excepted)
    quality: int  # JPEG quality of the re-encode
    upscale: bool  # whether originals smaller than prep_size were enlarged
    count: int
    classes: list[str]  # wnids in label order (sorted)
    class_names: list[str]  # human names where the source knows them, else ""
    counts_per_class: list[int]
    rejects: list[dict[str, str]]  # {"name", "reason"} per skipped source member
    source: dict[str, Any]  # identity of what was read (layout, paths, sizes)
    build: dict[str, Any]  # tool version, codecs, decode plan: what made these bytes
    files: dict[str, dict[str, Any]]  # name -> {"bytes", "sha256"} of every other file
    # {"name", "conversion"} per source member that had to be converted to become an RGB JPEG
    # (CMYK, grayscale, palette, alpha, PNG...); absent from manifests written before it existed.
    conversions: list[dict[str, str]] = dataclasses.field(default_factory=list)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def write_manifest(dataset_dir: Path, manifest: Manifest) -> Path:
    text = json.dumps(dataclasses.asdict(manifest), indent=1, sort_keys=True) + "\n"
    return write_atomic(dataset_dir / MANIFEST_FILE, lambda f: f.write(text.encode("utf-8")))


def read_manifest(dataset_dir: Path) -> Manifest:
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST_FILE
    if not dataset_dir.is_dir():
        raise DatasetError(f"{dataset_dir}: no such dataset directory")
    if not path.is_file():
        raise DatasetError(
            f"{dataset_dir}: no {MANIFEST_FILE}, so not a complete dataset (unfinished build?)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: not a {FORMAT_NAME} manifest")
    version = raw.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        known = ", ".join(map(str, READABLE_FORMAT_VERSIONS))
        raise DatasetError(
            f"{path}: format_version {version!r}, this reader knows {known}; "
            "rebuild the shards or upgrade shardtrain"
        )
    names = {f.name for f in dataclasses.fields(Manifest)}
    unknown, missing = set(raw) - names, names - set(raw) - OPTIONAL_FIELDS
    if unknown or missing:
        raise DatasetError(
            f"{path}: bad fields (unknown {sorted(unknown)}, missing {sorted(missing)})"
        )
    manifest = Manifest(**raw)
    if manifest.store not in STORES:
        raise DatasetError(f"{path}: unknown store {manifest.store!r}")
    return manifest


def load_records(dataset_dir: Path, manifest: Manifest) -> np.ndarray:
    """The per-record table (label, height, width, orig size, crc32), one row per record."""
    path = Path(dataset_dir) / RECORDS_FILE
    try:
        records = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable record table ({err})") from None
    if records.dtype != RECORD_DTYPE or records.shape != (manifest.count,):
        raise DatasetError(
            f"{path}: expected {manifest.count} records of {RECORD_DTYPE}, "
            f"found {records.shape} of {records.dtype}"
        )
    return records


def load_names(dataset_dir: Path, manifest: Manifest) -> list[str]:
    """Source member names (e.g. n01440764_10026.JPEG), for error messages and lookups."""
    path = Path(dataset_dir) / NAMES_FILE
    try:
        names = parse_names(path.read_bytes(), manifest.format_version)
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: unreadable names ({err})") from None
    if len(names) != manifest.count:
        raise DatasetError(f"{path}: {len(names)} names for {manifest.count} records")
    return names

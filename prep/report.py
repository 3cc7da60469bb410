"""What prep prints: build summaries, verify reports, `prep info`. Pure formatting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from formats import split_dir_name
from formats.manifest import load_records, read_manifest
from formats.names import escape_name

MAX_LISTED = 20


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 20):,.1f} MiB"


def _file_bytes(dataset_dir: Path, name: str) -> int:
    path = Path(dataset_dir) / name
    return path.stat().st_size if path.exists() else 0


def dataset_info(dataset_dir: Path) -> dict:
    manifest = read_manifest(dataset_dir)
    records = load_records(dataset_dir, manifest)
    store_bytes = sum(
        _file_bytes(dataset_dir, name)
        for name in manifest.files
        if name.startswith("shard-") or name == "data.mdb"
    )
    return {
        "path": str(Path(dataset_dir)),
        "store": manifest.store,
        "split": manifest.split,
        "prep_size": manifest.prep_size,
        "count": manifest.count,
        "num_classes": manifest.num_classes,
        "quality": manifest.quality,
        "upscale": manifest.upscale,
        "rejects": manifest.rejects,
        "conversions": manifest.conversions,
        "num_stored_as_is": manifest.build.get("num_stored_as_is", 0),
        "bytes": sum(_file_bytes(dataset_dir, name) for name in manifest.files),
        "store_bytes": store_bytes,
        "mean_record_bytes": store_bytes / max(manifest.count, 1),
        "median_height": int(np.median(records["height"])) if manifest.count else 0,
        "median_width": int(np.median(records["width"])) if manifest.count else 0,
        "num_small_originals": int(
            np.sum(np.minimum(records["orig_height"], records["orig_width"]) < manifest.prep_size)
        ),
        "min_class_count": min(manifest.counts_per_class, default=0),
        "max_class_count": max(manifest.counts_per_class, default=0),
        "source_layout": manifest.source.get("layout"),
        "build": manifest.build,
        "format_version": manifest.format_version,
    }


def format_info(info: dict) -> str:
    lines = [
        f"{info['path']}: {info['split']} at prep_size {info['prep_size']} ({info['store']}, "
        f"format v{info['format_version']})",
        f"  records   {info['count']:,} in {info['num_classes']} classes "
        f"({info['min_class_count']}..{info['max_class_count']} per class)",
        f"  size      {_mib(info['bytes'])}, {info['mean_record_bytes'] / 1024:.1f} KiB per "
        f"record, JPEG q{info['quality']}",
        f"  images    median {info['median_height']}x{info['median_width']}, "
        f"{info['num_small_originals']} small originals kept as they are",
        f"  source    {info['source_layout']}; codecs {info['build'].get('codecs')}",
        f"  as is     {info['num_stored_as_is']:,} records are the source's own JPEG bytes "
        "(already at size)",
        f"  rejected  {len(info['rejects'])}",
    ]
    lines += _listed(info["rejects"], "  rejected", "reason")
    lines.append(f"  converted {len(info['conversions'])}")
    lines += _listed(info["conversions"], "  converted", "conversion")
    return "\n".join(lines)


def _listed(entries: list[dict], what: str, key: str) -> list[str]:
    """The first entries of a manifest list (rejects, conversions), then how many more."""
    lines = [
        f"  {what} {escape_name(entry['name'])}: {entry[key]}" for entry in entries[:MAX_LISTED]
    ]
    if len(entries) > MAX_LISTED:
        lines.append(
            f"  ... and {len(entries) - MAX_LISTED} more {what.strip()} (see prep info --json)"
        )
    return lines


def _dataset_line(dataset_dir: Path, state: str, manifest) -> str:
    size = sum(_file_bytes(dataset_dir, name) for name in manifest.files)
    stored_as_is = manifest.build.get("num_stored_as_is", 0)
    return (
        f"{dataset_dir}: {state}: {manifest.count:,} records, {manifest.num_classes} classes, "
        f"{_mib(size)}, {len(manifest.rejects)} rejected, {len(manifest.conversions)} converted, "
        f"{stored_as_is:,} stored as they were (already at size)"
    )


def format_build_summary(summary, out_dir: Path, split: str) -> str:
    lines = []
    for prep_size, manifest in sorted(summary.manifests.items()):
        state = "exists, not rebuilt (use --overwrite)" if prep_size in summary.skipped else "built"
        dataset_dir = summary.dataset_dirs.get(
            prep_size, out_dir / split_dir_name(split, prep_size)
        )
        lines.append(_dataset_line(dataset_dir, state, manifest))
    if summary.source_layout:
        lines.append(f"source: {summary.source_layout} layout")
    if summary.consumed:
        done = summary.consumed - summary.resumed_from
        resumed = (
            f" (resumed after {summary.resumed_from:,} done earlier)"
            if summary.resumed_from
            else ""
        )
        lines.append(
            f"{done:,} images in {summary.seconds:.2f} s = {summary.images_per_second:,.0f} img/s "
            f"with {summary.workers} workers{resumed}; codecs: {summary.codecs['pil']}, "
            f"{summary.codecs['turbojpeg']}"
        )
    if summary.manifests:  # the same members are rejected and converted for every size
        manifest = next(iter(summary.manifests.values()))
        lines += _listed(manifest.rejects, "rejected", "reason") + _listed(
            manifest.conversions, "converted", "conversion"
        )
    return "\n".join(lines)


def build_warnings(summary) -> list[str]:
    """What the user should know about a build that succeeded (the CLI prints these on stderr)."""
    first = next(iter(summary.manifests.values()), None)
    return [] if first is None else manifest_warnings(first)


def manifest_warnings(manifest) -> list[str]:
    """What the user should know about a finished dataset (a build's or a merge's)."""
    empty = [wnid for wnid, count in zip(manifest.classes, manifest.counts_per_class) if count == 0]
    if not empty:
        return []
    return [
        f"{len(empty)} of {manifest.num_classes} classes have no records: {', '.join(empty[:5])}"
        f"{', ...' if len(empty) > 5 else ''} (an empty class tar or folder, or every image in it "
        "rejected)"
    ]


def format_merge_summary(summary) -> str:
    manifest = summary.manifest
    resumed = (
        f" (resumed after {summary.resumed_from:,} records merged earlier)"
        if summary.resumed_from
        else ""
    )
    return "\n".join(
        [
            _dataset_line(
                summary.dataset_dir,
                f"merged from {summary.num_parts} parts in {summary.seconds:.2f} s{resumed}",
                manifest,
            ),
            *_listed(manifest.rejects, "rejected", "reason"),
            *_listed(manifest.conversions, "converted", "conversion"),
        ]
    )


def format_verify_report(report) -> str:
    head = (
        f"{report.dataset_dir}: {report.records_checked:,} records checked in "
        f"{report.seconds:.2f} s ({report.records_per_second:,.0f}/s)"
    )
    if report.ok:
        return f"{head}: OK"
    lines = [f"{head}: {len(report.faults)} FAULTS"]
    lines += [f"  {fault}" for fault in report.faults[:20]]
    if len(report.faults) > 20:
        lines.append(f"  ... and {len(report.faults) - 20} more")
    return "\n".join(lines)

"""What prep prints: build summaries, verify reports, `prep info`. Pure formatting."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from formats.manifest import load_records, read_manifest
from formats.names import escape_name
from formats.layout import split_dir_name


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 20):,.1f} MiB"


def _file_bytes(dataset_dir: Path, name: str) -> int:
    path = Path(dataset_dir) / name
    return path.stat().st_size if path.exists() else 0


def dataset_info(dataset_dir: Path) -> dict:
    manifest = read_manifest(dataset_dir)
    records = load_records(dataset_dir, manifest)
    store_bytes = sum(_file_bytes(dataset_dir, name) for name in manifest.files
                      if name.startswith("shard-") or name == "data.mdb")
    return {
        "path": str(Path(dataset_dir)), "store": manifest.store, "split": manifest.split,
        "prep_size": manifest.prep_size, "count": manifest.count, "num_classes": manifest.num_classes,
        "quality": manifest.quality, "upscale": manifest.upscale, "rejects": manifest.rejects,
        "bytes": sum(_file_bytes(dataset_dir, name) for name in manifest.files), "store_bytes": store_bytes,
        "mean_record_bytes": store_bytes / max(manifest.count, 1),
        "median_height": int(np.median(records["height"])) if manifest.count else 0,
        "median_width": int(np.median(records["width"])) if manifest.count else 0,
        "num_small_originals": int(np.sum(np.minimum(records["orig_height"], records["orig_width"]) < manifest.prep_size)),
        "min_class_count": min(manifest.counts_per_class, default=0),
        "max_class_count": max(manifest.counts_per_class, default=0),
        "source_layout": manifest.source.get("layout"), "build": manifest.build,
        "format_version": manifest.format_version,
    }


def format_info(info: dict) -> str:
    lines = [
        f"{info['path']}: {info['split']} at prep_size {info['prep_size']} ({info['store']}, format v{info['format_version']})",
        f"  records   {info['count']:,} in {info['num_classes']} classes ({info['min_class_count']}..{info['max_class_count']} per class)",
        f"  size      {_mib(info['bytes'])}, {info['mean_record_bytes'] / 1024:.1f} KiB per record, JPEG q{info['quality']}",
        f"  images    median {info['median_height']}x{info['median_width']}, {info['num_small_originals']} small originals kept as they are",
        f"  source    {info['source_layout']}; codecs {info['build'].get('codecs')}",
        f"  rejected  {len(info['rejects'])}",
    ]
    lines += [f"    {escape_name(r['name'])}: {r['reason']}" for r in info["rejects"][:20]]
    if len(info["rejects"]) > 20:
        lines.append(f"    ... and {len(info['rejects']) - 20} more (prep info --json lists all)")
    return "\n".join(lines)


def format_build_summary(summary, out_dir: Path, split: str) -> str:
    lines = []
    for prep_size, manifest in sorted(summary.manifests.items()):
        state = "exists, not rebuilt (use --overwrite)" if prep_size in summary.skipped else "built"
        size = sum(_file_bytes(out_dir / split_dir_name(split, prep_size), name) for name in manifest.files)
        lines.append(f"{out_dir / split_dir_name(split, prep_size)}: {state}: {manifest.count:,} records, "
                     f"{manifest.num_classes} classes, {_mib(size)}, {len(manifest.rejects)} rejected")
    if summary.consumed:
        done = summary.consumed - summary.resumed_from
        resumed = f" (resumed after {summary.resumed_from:,} done earlier)" if summary.resumed_from else ""
        lines.append(f"{done:,} images in {summary.seconds:.2f} s = {summary.images_per_second:,.0f} img/s "
                     f"with {summary.workers} workers{resumed}; codecs: {summary.codecs['pil']}, {summary.codecs['turbojpeg']}")
    rejects = next(iter(summary.manifests.values())).rejects if summary.manifests else []
    for reject in rejects[:20]:
        lines.append(f"  rejected {escape_name(reject['name'])}: {reject['reason']}")
    if len(rejects) > 20:
        lines.append(f"  ... and {len(rejects) - 20} more (see prep info --json)")
    return "\n".join(lines)


def build_warnings(summary) -> list[str]:
    """What the user should know about a build that succeeded (the CLI prints these on stderr)."""
    first = next(iter(summary.manifests.values()), None)
    if first is None:
        return []
    empty = [wnid for wnid, count in zip(first.classes, first.counts_per_class) if count == 0]
    if not empty:
        return []
    return [f"{len(empty)} of {first.num_classes} classes have no records: {', '.join(empty[:5])}"
            f"{', ...' if len(empty) > 5 else ''} (an empty class tar or folder, or every image in it rejected)"]


def format_verify_report(report) -> str:
    head = (f"{report.dataset_dir}: {report.records_checked:,} records checked in {report.seconds:.2f} s "
            f"({report.records_per_second:,.0f}/s)")
    if report.ok:
        return f"{head}: OK"
    lines = [f"{head}: {len(report.faults)} FAULTS"]
    lines += [f"  {fault}" for fault in report.faults[:20]]
    if len(report.faults) > 20:
        lines.append(f"  ... and {len(report.faults) - 20} more")
    return "\n".join(lines)

"""`prep`: build, verify and inspect shard datasets. Parses arguments and calls one library
function per command; errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Raw ImageNet archives or class folders -> resolution-specific LMDB/msgpack shards.",
)

SRC = typer.Option(
    ...,
    "--src",
    help="Directory with ILSVRC2012_img_{train,val}.tar (+ devkit), train/ and val/ class "
    "folders, Hugging Face imagenet-1k (parquet or tar.gz; also its cache dir), or "
    "WebDataset shards.",
)
OUT = typer.Option(
    ..., "--out", help="Output directory; each dataset goes to <out>/<split>-<size>/."
)
SPLIT = typer.Option("train", "--split", help="train or val.")
SIZES = typer.Option(
    ...,
    "--size",
    help="Shorter side in px of stored images (prep_size); repeat for several sizes, one decode "
    "each.",
)
QUALITY = typer.Option(90, "--quality", help="JPEG quality of the re-encode.")
WORKERS = typer.Option(
    None, "--workers", help="Decode/resize processes (default: all cores; 0 = in-process)."
)
UPSCALE = typer.Option(
    False,
    "--upscale",
    help="Enlarge originals smaller than --size (default: keep them as they are).",
)
STRICT = typer.Option(
    False, "--strict", help="Fail on the first unreadable member instead of listing it as rejected."
)
OVERWRITE = typer.Option(
    False,
    "--overwrite",
    help="Rebuild even if the dataset exists (or discard an unfinished build with other settings).",
)
VAL_LABELS = typer.Option(
    None,
    "--val-labels",
    help="Validation labels: LOC_val_solution.csv or `filename label` lines (default: the devkit "
    "in --src).",
)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar (for logs).")
COMMIT_EVERY = typer.Option(
    1000,
    "--commit-every",
    help="Records between durable commits: a kill loses at most this much work; also bounds "
    "memory.",
)
REENCODE = typer.Option(
    False,
    "--reencode",
    help="Re-encode every image (default: a baseline RGB JPEG already at its stored size is kept "
    "byte for byte).",
)
NUM_PARTS = typer.Option(
    None,
    "--num-parts",
    help="Split the source into this many contiguous parts and build one (--part-index); join "
    "them with `prep merge`. Under torchrun: WORLD_SIZE.",
)
PART_INDEX = typer.Option(
    None,
    "--part-index",
    help="Which part to build, 0-based (e.g. $SLURM_ARRAY_TASK_ID). Under torchrun: RANK.",
)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"prep: error: {message}", err=True)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so cleanup runs exactly as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _run(fn, resumable: bool = True):
    """Library errors -> one stderr line. Anything else is a bug and keeps its traceback.
    SIGTERM is handled like SIGINT (exit 143 instead of 130)."""
    from formats import DatasetError
    from prep.labels import SourceError
    from prep.partial import BuildError

    hint = "; rerun the same command to resume" if resumable else ""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return fn()
    except (BuildError, SourceError, DatasetError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"{err.filename or ''}: {err.strerror or err}".lstrip(": "))
    except Terminated:
        _fail(f"terminated (SIGTERM){hint}", 128 + signal.SIGTERM)
    except KeyboardInterrupt:
        _fail(f"interrupted{hint}", 128 + signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _workers(requested: Optional[int]) -> int:
    """--workers checked and capped (with a warning on stderr), before anything starts."""
    from prep.build import resolve_workers

    workers, warning = _run(lambda: resolve_workers(requested), resumable=False)
    if warning:
        typer.echo(f"prep: warning: {warning}", err=True)
    return workers


def _build(
    store: str,
    src: Path,
    out: Path,
    split: str,
    sizes: List[int],
    quality: int,
    workers: Optional[int],
    upscale: bool,
    strict: bool,
    overwrite: bool,
    val_labels: Optional[Path],
    quiet: bool,
    commit_every: int,
    reencode: bool,
    num_parts: Optional[int],
    part_index: Optional[int],
    shard_mb: int = 256,
) -> None:
    from prep.build import BuildConfig
    from prep.launch import default_build_workers, run_build
    from prep.parts import PartSpec
    from prep.report import (
        build_warnings,
        format_build_summary,
        format_merge_summary,
        manifest_warnings,
    )

    if (num_parts is None) != (part_index is None):
        _fail("--num-parts and --part-index go together (or neither, under torchrun)")
    num_workers = default_build_workers() if workers is None else _workers(workers)

    def launch():
        config = BuildConfig(
            src_dir=src,
            out_dir=out,
            split=split,
            prep_sizes=tuple(sizes),
            store=store,
            quality=quality,
            upscale=upscale,
            workers=num_workers,
            strict=strict,
            overwrite=overwrite,
            val_labels=val_labels,
            shard_bytes=shard_mb << 20,
            quiet=quiet,
            commit_every=commit_every,
            reencode=reencode,
            part=None if num_parts is None else PartSpec(part_index, num_parts),
        )
        return run_build(config)

    result = _run(launch)
    prefix = "" if result.rank is None else f"[rank {result.rank}] "
    typer.echo(
        "\n".join(
            prefix + line for line in format_build_summary(result.build, out, split).splitlines()
        )
    )
    # a part holds some classes only: whether a class is empty is the whole dataset's to say
    warnings = build_warnings(result.build) if num_parts is None and result.rank is None else []
    for merged in result.merges:
        typer.echo(format_merge_summary(merged))
        warnings += manifest_warnings(merged.manifest)
    for warning in warnings:
        typer.echo(f"prep: warning: {warning}", err=True)


@app.command("build-lmdb")
def build_lmdb(
    src: Path = SRC,
    out: Path = OUT,
    split: str = SPLIT,
    size: List[int] = SIZES,
    quality: int = QUALITY,
    workers: Optional[int] = WORKERS,
    upscale: bool = UPSCALE,
    strict: bool = STRICT,
    overwrite: bool = OVERWRITE,
    val_labels: Optional[Path] = VAL_LABELS,
    quiet: bool = QUIET,
    commit_every: int = COMMIT_EVERY,
    reencode: bool = REENCODE,
    num_parts: Optional[int] = NUM_PARTS,
    part_index: Optional[int] = PART_INDEX,
) -> None:
    """Build <out>/<split>-<size>/ as one LMDB environment per size."""
    _build(
        "lmdb",
        src,
        out,
        split,
        size,
        quality,
        workers,
        upscale,
        strict,
        overwrite,
        val_labels,
        quiet,
        commit_every,
        reencode,
        num_parts,
        part_index,
    )


@app.command("build-msgpack")
def build_msgpack(
    src: Path = SRC,
    out: Path = OUT,
    split: str = SPLIT,
    size: List[int] = SIZES,
    quality: int = QUALITY,
    workers: Optional[int] = WORKERS,
    upscale: bool = UPSCALE,
    strict: bool = STRICT,
    overwrite: bool = OVERWRITE,
    val_labels: Optional[Path] = VAL_LABELS,
    quiet: bool = QUIET,
    commit_every: int = COMMIT_EVERY,
    reencode: bool = REENCODE,
    num_parts: Optional[int] = NUM_PARTS,
    part_index: Optional[int] = PART_INDEX,
    shard_mb: int = typer.Option(
        256, "--shard-mb", help="Roll to a new shard file past this size."
    ),
) -> None:
    """Build <out>/<split>-<size>/ as msgpack shard files plus an offsets index."""
    _build(
        "msgpack",
        src,
        out,
        split,
        size,
        quality,
        workers,
        upscale,
        strict,
        overwrite,
        val_labels,
        quiet,
        commit_every,
        reencode,
        num_parts,
        part_index,
        shard_mb,
    )


@app.command()
def merge(
    part_dirs: List[Path] = typer.Argument(
        ..., help="Every part directory of one build, e.g. shards/train-160.part-*-of-8."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output directory; the dataset goes to <out>/<split>-<size>/."
    ),
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
) -> None:
    """Join the parts of a --num-parts build into the dataset one machine would have built."""
    from prep.merge import merge as run_merge
    from prep.report import format_merge_summary, manifest_warnings

    summary = _run(lambda: run_merge(part_dirs, out, overwrite=overwrite, quiet=quiet))
    typer.echo(format_merge_summary(summary))
    for warning in manifest_warnings(summary.manifest):
        typer.echo(f"prep: warning: {warning}", err=True)
    # reached only once merge checked every part and its own result (digests, record table)
    typer.echo(
        f"merged dataset checked: the {summary.num_parts} part directories are no longer needed "
        "(rm -r them)"
    )


@app.command()
def verify(
    dataset_dir: Path = typer.Argument(..., help="A dataset directory, e.g. shards/train-160."),
    source: Optional[Path] = typer.Option(
        None, "--source", help="Also check counts against the raw source directory."
    ),
    val_labels: Optional[Path] = VAL_LABELS,
    workers: Optional[int] = WORKERS,
    quiet: bool = QUIET,
) -> None:
    """Re-read everything and compare with the manifest; exit 1 on any fault."""
    from prep.report import format_verify_report
    from prep.verify import verify as run_verify

    num_workers = _workers(workers)
    report = _run(
        lambda: run_verify(dataset_dir, num_workers, source, val_labels, quiet), resumable=False
    )
    typer.echo(format_verify_report(report))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def info(
    dataset_dir: Path = typer.Argument(..., help="A dataset directory, e.g. shards/train-160."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text."),
) -> None:
    """Print a dataset's summary from its manifest."""
    from prep.report import dataset_info, format_info

    summary = _run(lambda: dataset_info(dataset_dir), resumable=False)
    typer.echo(json.dumps(summary, sort_keys=True) if as_json else format_info(summary))


@app.command()
def sample(
    out: Path = typer.Option(
        ..., "--out", help="Directory for the three ILSVRC2012-format archives."
    ),
    num_classes: int = typer.Option(10, "--classes"),
    train_per_class: int = typer.Option(80, "--train-per-class"),
    val_per_class: int = typer.Option(20, "--val-per-class"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a small procedurally generated dataset in ImageNet's exact archive format."""
    from prep.sample import write_sample

    result = _run(
        lambda: write_sample(
            out,
            num_classes=num_classes,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            seed=seed,
        ),
        resumable=False,
    )
    typer.echo(
        f"wrote {result.train_tar_path}, {result.val_tar_path}, {result.devkit_path} "
        f"({result.num_classes} classes, {result.train_per_class} train + {result.val_per_class} "
        "val images each)"
    )


@app.callback()
def main() -> None:
    """Keeps subcommands as subcommands (typer collapses a one-command app)."""


if __name__ == "__main__":
    sys.exit(app())

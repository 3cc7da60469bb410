"""`train`: the command line. Parses arguments and calls one library function per command.

The only module in train/ that imports typer. Library errors become one line on stderr,
`train: error: ...`, and a non-zero exit status.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train torchvision models on shardtrain shards (see phases/*.json).")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


@app.callback()
def main() -> None:
    """Keeps `run` a subcommand (typer would otherwise turn a one-command app into it)."""


def fail(message: str, code: int = EXIT_ERROR, kind: str = "error") -> NoReturn:
    typer.echo(f"train: {kind}: {message}", err=True)
    raise typer.Exit(code)


# Library error classes by module. Only modules already imported can have raised one, so
# `train report` never pays for importing torch just to name an error class.
LIBRARY_ERRORS = {
    "formats.errors": ("DatasetError",), "train.run.checkpoint": ("CheckpointError",),
    "train.plan.config": ("TrainError", "RecipeError"), "train.engine.dist": ("DistError",),
    "train.export": ("ExportError",), "train.run.report": ("ReportError",),
    "train.plan.schedule": ("ScheduleError",), "train.engine.step": ("PrecisionError",),
}


def library_errors() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, names in LIBRARY_ERRORS.items()
                 if module in sys.modules for name in names)


def parse_targets(values: List[str]) -> tuple[tuple[str, float], ...]:
    targets = []
    for value in values:
        metric, _, number = value.partition("=")
        try:
            if metric not in ("top1", "top5"):
                raise ValueError
            targets.append((metric, float(number)))
        except ValueError:
            fail(f"--target {value!r}: expected top1=<percent> or top5=<percent>")
    return tuple(targets)


def call(fn, *args, **kwargs):
    """Run a library function; its errors exit with one line instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if not isinstance(exc, library_errors()):
            raise
        interrupted = getattr(sys.modules.get("train.plan.config"), "Interrupted", ())
        if interrupted and isinstance(exc, interrupted):  # SIGINT/SIGTERM: saved, not failed
            fail(str(exc), EXIT_INTERRUPTED, kind="interrupted")
        fail(str(exc))


@app.command()
def run(
    phases: Path = typer.Option(..., help="phases.json (ours or imagenet18's format)"),
    data: Optional[Path] = typer.Option(None, help="directory holding train-<N>/ and val-<N>/"),
    out: Optional[Path] = typer.Option(None, help="run directory [default: runs/<phases stem>]"),
    arch: Optional[str] = typer.Option(None, help="torchvision model or timm/<name> [default: recipe's, else resnet50]"),
    device: str = typer.Option("auto", help="auto | cuda | cpu"),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile, each phase's shape warmed first"),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
    seed: int = typer.Option(0, help="same seed, same data order and init (bit-exact on CPU)"),
    resume: Optional[str] = typer.Option(None, help="'auto' (continue OUT's run if any) or a checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="clear OUT's old run outputs and start fresh"),
    allow_changed: bool = typer.Option(False, "--allow-changed", help="resume although recipe, schedule, seed or precision changed (recorded in config.json)"),
    workers: int = typer.Option(4, help="loader workers per GPU: decode threads in the training process (worker processes with auto_augment or without the native decoder); capped at 4 per core, with a warning"),
    decode: str = typer.Option("cpu", help="JPEG decode: cpu | gpu"),
    eval_every: int = typer.Option(1, help="evaluate every N epochs (the last always)"),
    checkpoint_every_steps: int = typer.Option(0, help="also checkpoint every N steps (0: epochs only)"),
    log_every: int = typer.Option(20, help="steps between progress updates"),
    label_smoothing: Optional[float] = typer.Option(None, help="override the recipe's"),
    mixup: Optional[float] = typer.Option(None, help="mixup alpha (0 = off)"),
    cutmix: Optional[float] = typer.Option(None, help="cutmix alpha (0 = off)"),
    ema: Optional[float] = typer.Option(None, help="EMA decay of the weights, e.g. 0.9999 (0 = off)"),
    flip_tta: Optional[bool] = typer.Option(None, "--flip-tta/--no-flip-tta", help="flip-average the final eval"),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="SyncBatchNorm across GPUs (CUDA)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic", help="deterministic kernels [default: on for CPU, off for CUDA]"),
    full_prep_size: Optional[int] = typer.Option(None, help="imagenet18 lists: prep_size standing in for full-size images"),
    target: List[str] = typer.Option([], help="top1=75.9 or top5=93 (repeatable)"),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the per-epoch table and check shards; train nothing"),
) -> None:
    """Train as PHASES says; torchrun --nproc_per_node=N -m train run ... for N GPUs."""
    from train.plan.config import RunConfig
    from train.run.main import run as run_training

    config = RunConfig(
        phases_path=phases, data_dir=data, out_dir=out, arch=arch, device=device,
        precision=precision, compile=compile, channels_last=channels_last, seed=seed,
        resume=resume, overwrite=overwrite, allow_changed=allow_changed, workers=workers,
        decode=decode, eval_every=eval_every,
        checkpoint_every_steps=checkpoint_every_steps, log_every=log_every,
        label_smoothing=label_smoothing, mixup_alpha=mixup, cutmix_alpha=cutmix,
        ema_decay=ema, flip_tta=flip_tta, sync_bn=sync_bn, threads=threads,
        deterministic=deterministic,
        full_prep_size=full_prep_size, targets=parse_targets(target),
        tensorboard=tensorboard, progress=progress, dry_run=dry_run)
    call(run_training, config)


@app.command()
def bench(
    phases: Path = typer.Option(..., help="phases.json whose phases to measure"),
    data: Optional[Path] = typer.Option(None, help="shards for the end-to-end numbers (else synthetic only)"),
    arch: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("auto"),
    compile: bool = typer.Option(False, "--compile"),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
    steps: int = typer.Option(30, help="timed steps per phase and source"),
    warmup: int = typer.Option(5, help="untimed steps first"),
    workers: int = typer.Option(4),
    decode: str = typer.Option("cpu"),
) -> None:
    """Per phase: img/s on synthetic on-device data vs real shards, and the data-wait share."""
    from train.bench import BenchConfig, bench_phases, format_bench

    rows = call(bench_phases, BenchConfig(
        phases_path=phases, data_dir=data, arch=arch, device=device, precision=precision,
        compile=compile, channels_last=channels_last, steps=steps, warmup_steps=warmup,
        workers=workers, decode=decode))
    typer.echo(format_bench(rows))


@app.command("bench-loader")
def bench_loader(
    data: Path = typer.Option(..., help="one shard directory, e.g. /data/shards/train-160"),
    crop_size: int = typer.Option(..., help="output side in px"),
    batch_size: int = typer.Option(256),
    workers: int = typer.Option(4),
    batches: int = typer.Option(50, help="timed batches"),
    decode: str = typer.Option("cpu", help="cpu | gpu"),
    val: bool = typer.Option(False, "--val", help="the validation loader instead of training"),
    rect: bool = typer.Option(False, "--rect", help="rect validation batches (with --val)"),
    warmup: int = typer.Option(5, help="untimed batches first"),
    min_scale: float = typer.Option(0.08),
) -> None:
    """Loader throughput alone; the LAST line is machine-readable: img_per_s=<float>."""
    from train.bench_loader import bench_loader as run_bench

    result = call(run_bench, data, crop_size, batch_size, workers, batches, decode=decode,
                  val=val, rect=rect, warmup_batches=warmup, min_scale=min_scale)
    for key, value in result.items():
        if key != "img_per_s":
            typer.echo(f"{key}: {value}")
    typer.echo(f"img_per_s={float(result['img_per_s'])}")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="run directories (several: one plot)"),
    target: List[str] = typer.Option([], help="top1=75.9 or top5=93 (repeatable) [default: the run's]"),
    plot: Optional[Path] = typer.Option(None, help="PNG path [default: <first run>/curves.png]"),
) -> None:
    """Time-to-accuracy table (with and without eval time) and a PNG of the curves."""
    from train.run.report import report as make_report

    typer.echo(call(make_report, run_dirs, dict(parse_targets(target)) or None, plot))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="run directory (final.pt, else last.pt) or a .pt"),
    out: Path = typer.Option(..., help="where to write the state_dict"),
    ema: bool = typer.Option(False, "--ema", help="export the EMA weights"),
) -> None:
    """A state_dict that torchvision's constructor for the arch loads strictly."""
    from train.export import export as run_export

    info = call(run_export, run_dir, out, ema=ema)
    typer.echo(f"wrote {info['out']}: {info['arch']} ({info['num_classes']} classes, epoch "
               f"{info['epoch']}{', EMA' if info['ema'] else ''}) from {info['source']}")
    if info["blurpool"]:
        typer.echo("note: trained with BlurPool: after load_state_dict, call "
                   "train.engine.layers.add_blurpool(model) (no weights) to compute what the run evaluated")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

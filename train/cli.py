"""`train`: the command line, the only typer user; one library call per command, each error
as one line."""

from __future__ import annotations

import inspect
import sys
from dataclasses import MISSING
from pathlib import Path
from typing import Any, List, Mapping, NoReturn, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train torchvision models on shardtrain shards (see phases/*.json).",
)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


@app.callback()
def main() -> None:
    """Keeps `run` a subcommand (typer would otherwise turn a one-command app into it)."""


def fail(message: str, code: int = EXIT_ERROR, kind: str = "error") -> NoReturn:
    typer.echo(f"train: {kind}: {message}", err=True)
    raise typer.Exit(code)


def parse_targets(values: List[str], flag: str = "--target") -> tuple[tuple[str, float], ...]:
    from train.plan.config import TARGET_METRICS

    targets = []
    for value in values:
        metric, _, number = value.partition("=")
        try:
            if metric not in TARGET_METRICS:
                raise ValueError
            targets.append((metric, float(number)))
        except ValueError:
            fail(f"{flag} {value!r}: expected top1=<percent> or top5=<percent>")
    return tuple(targets)


def call(fn, *args, **kwargs):
    """Run a library function; its errors exit with one line instead of a traceback."""
    from train.errors import REPORTED, Interrupted

    try:
        return fn(*args, **kwargs)
    except Interrupted as exc:  # SIGINT/SIGTERM: saved, not failed
        fail(str(exc), EXIT_INTERRUPTED, kind="interrupted")
    except REPORTED as exc:
        fail(str(exc))


def option(name: str, kind: Any, default: Any, meta: Mapping[str, Any]) -> inspect.Parameter:
    """A typer option from a declared setting (train.plan.settings): name, help, default."""
    from train.plan.config import option_name

    flag = option_name(name, meta.get("flag"))
    names = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    help_text = meta.get("help", "")
    if meta.get("choices"):
        help_text += f" ({' | '.join(meta['choices'])})"
    annotation = Optional[kind] if default is None else kind
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=typer.Option(default, *names, help=help_text),
    )


def run_options() -> list[inspect.Parameter]:
    """RunConfig's settings, then the recipe's cli=True ones (default None: the recipe's)."""
    from train.plan.config import Recipe, RunConfig
    from train.plan.settings import declared

    params = [
        option(f.name, kind, ... if f.default is MISSING else f.default, f.metadata)
        for f, kind, _ in declared(RunConfig)
        if "help" in f.metadata
    ]
    params += [
        option(f.name, kind, None, f.metadata)
        for f, kind, _ in declared(Recipe)
        if f.metadata.get("cli")
    ]
    target = typer.Option([], help="top1=75.9 or top5=93 (repeatable)")
    stop_at = typer.Option(
        [], help="top1=75.9: end the run at the first evaluation reaching it (repeatable: all)"
    )
    return params + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=List[str], default=d)
        for name, d in (("target", target), ("stop_at", stop_at))
    ]


def run(**options: Any) -> None:
    """Train as PHASES says; torchrun --nproc_per_node=N -m train run ... for N GPUs."""
    from train.plan.config import RECIPE_OPTIONS, RunConfig
    from train.run.main import run as run_training

    recipe = {name: options.pop(name) for name in RECIPE_OPTIONS}
    recipe = {name: value for name, value in recipe.items() if value is not None}
    targets = parse_targets(options.pop("target"))
    stop_at = parse_targets(options.pop("stop_at"), "--stop-at")
    call(run_training, RunConfig(**options, targets=targets, stop_at=stop_at, recipe=recipe))


run.__signature__ = inspect.Signature(run_options())
app.command()(run)


@app.command()
def bench(
    phases: Path = typer.Option(..., help="phases.json whose phases to measure"),
    data: Optional[Path] = typer.Option(
        None, help="shards for the end-to-end numbers (else synthetic only)"
    ),
    arch: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("auto"),
    compile: bool = typer.Option(False, "--compile"),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
    steps: int = typer.Option(30, help="timed steps per phase and source"),
    warmup: int = typer.Option(5, help="untimed steps first"),
    workers: int = typer.Option(4),
    decode: str = typer.Option("cpu"),
    optimizers: bool = typer.Option(
        False,
        "--optimizers",
        help="instead: each optimizer's step time vs SGD at the first phase's batch and crop",
    ),
) -> None:
    """Per phase: img/s on synthetic on-device data vs real shards, and the data-wait share."""
    from train.bench.phases import BenchConfig, bench_phases, format_bench

    config = BenchConfig(
        phases_path=phases,
        data_dir=data,
        arch=arch,
        device=device,
        precision=precision,
        compile=compile,
        channels_last=channels_last,
        steps=steps,
        warmup_steps=warmup,
        workers=workers,
        decode=decode,
    )
    if optimizers:
        from train.bench.optim import bench_optimizers, format_optimizer_rows

        typer.echo(format_optimizer_rows(*call(bench_optimizers, config)))
        return
    typer.echo(format_bench(call(bench_phases, config)))


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
    color_jitter: float = typer.Option(
        0.0, help="recipe's color_jitter (drawn in the workers, applied with --prefetch)"
    ),
    random_erasing: float = typer.Option(
        0.0, help="recipe's random_erasing (drawn in the workers, applied with --prefetch)"
    ),
    repeat_aug: int = typer.Option(1, help="recipe's repeat_aug"),
    auto_augment: Optional[str] = typer.Option(None, help="recipe's auto_augment policy"),
    prefetch: bool = typer.Option(
        False,
        "--prefetch",
        help="also run train.data.prefetch on the CPU (normalise; ColorJitter, random erasing)",
    ),
) -> None:
    """Loader throughput alone; the LAST line is machine-readable: img_per_s=<float>."""
    from train.bench.loader import bench_loader as run_bench
    from train.data.augment import Augmentation

    result = call(
        run_bench,
        data,
        crop_size,
        batch_size,
        workers,
        batches,
        decode=decode,
        val=val,
        rect=rect,
        warmup_batches=warmup,
        min_scale=min_scale,
        augment=Augmentation(auto_augment, color_jitter, random_erasing, repeat_aug),
        prefetch=prefetch,
    )
    for key, value in result.items():
        if key != "img_per_s":
            typer.echo(f"{key}: {value}")
    typer.echo(f"img_per_s={float(result['img_per_s'])}")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="run directories (several: one plot)"),
    target: List[str] = typer.Option(
        [], help="top1=75.9 or top5=93 (repeatable) [default: the run's]"
    ),
    plot: Optional[Path] = typer.Option(None, help="PNG path [default: <first run>/curves.png]"),
) -> None:
    """Time-to-accuracy table (with and without eval time) and a PNG of the curves."""
    from train.run.report import report as make_report

    typer.echo(call(make_report, run_dirs, dict(parse_targets(target)) or None, plot))


CHECKPOINT_HELP = "a run directory's best | final | last (default: final.pt, else last.pt)"


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="run directory (final.pt, else last.pt) or a .pt"),
    out: Path = typer.Option(..., help="where to write the state_dict"),
    ema: bool = typer.Option(False, "--ema", help="export the EMA weights"),
    checkpoint: Optional[str] = typer.Option(None, help=CHECKPOINT_HELP),
) -> None:
    """A state_dict that torchvision's constructor for the arch loads strictly."""
    from train.export import export as run_export

    info = call(run_export, run_dir, out, ema=ema, which=checkpoint)
    typer.echo(
        f"wrote {info['out']}: {info['arch']} ({info['num_classes']} classes, epoch "
        f"{info['epoch']}{', EMA' if info['ema'] else ''}) from {info['source']}"
    )
    if info["blurpool"]:
        typer.echo(
            "note: trained with BlurPool: after load_state_dict, call "
            "train.engine.layers.add_blurpool(model) (no weights) to compute what the run evaluated"
        )


@app.command("eval")
def eval_command(
    source: Path = typer.Argument(
        ..., help="run directory, one of its checkpoints, or a torchvision/timm state_dict"
    ),
    data: Path = typer.Option(..., help="val shards: D/val-<N>, or D with --prep-size"),
    checkpoint: Optional[str] = typer.Option(None, help=CHECKPOINT_HELP),
    arch: Optional[str] = typer.Option(None, help="a state_dict's model: resnet50, timm/<name>"),
    prep_size: Optional[int] = typer.Option(None, help="read D/val-<N> (default: the run's)"),
    crop_size: Optional[int] = typer.Option(None, help="(default: the run's, else 224)"),
    resize_size: Optional[int] = typer.Option(
        None, help="shorter side before the center crop (default: the run's, else crop / 0.875)"
    ),
    rect: Optional[bool] = typer.Option(
        None, "--rect/--center", help="imagenet18's rect batches (default: the run's)"
    ),
    ema: bool = typer.Option(False, "--ema", help="the checkpoint's EMA weights"),
    flip_tta: bool = typer.Option(False, "--flip-tta", help="average with the flipped image"),
    batch_size: int = typer.Option(100, help="per GPU"),
    workers: int = typer.Option(4),
    device: str = typer.Option("auto", help="auto | cuda | cpu"),
    precision: str = typer.Option(
        "auto", help="auto (the run's, else bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16"
    ),
    decode: str = typer.Option("cpu", help="cpu | gpu"),
) -> None:
    """Top-1/top-5 on validation shards, as ONE JSON line on stdout; torchrun -m train eval
    for several GPUs (exact: each image counted once)."""
    import json

    from train.engine.launch import is_main_process
    from train.evaluate import EvalConfig, evaluate_weights
    from train.plan.config import DECODERS, DEVICES, PRECISIONS

    for flag, value, allowed in (
        ("--device", device, DEVICES),
        ("--precision", precision, PRECISIONS),
        ("--decode", decode, DECODERS),
    ):
        if value not in allowed:
            fail(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    config = EvalConfig(
        source,
        data,
        checkpoint,
        arch,
        prep_size,
        crop_size,
        resize_size,
        rect,
        ema,
        flip_tta,
        batch_size,
        workers,
        device,
        precision,
        decode,
    )
    result = call(evaluate_weights, config)
    if is_main_process():
        typer.echo(json.dumps(result))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

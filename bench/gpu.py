"""ResNet training img/s on one GPU, end to end from shards, against the model's ceiling and the
default a user would otherwise run, in one table (one device call, under --budget-seconds):

  (a) synthetic batches already on the GPU: the model's ceiling (also fp16, and torch.compile)
  (b) ours: TrainLoader over LMDB shards, decode="cpu", --workers processes (default: all cores)
  (c) ours: TrainLoader, decode="gpu" (nvJPEG); skipped without CUDA
  (d) torchvision ImageFolder + PIL on the fixture's full-size JPEGs (RandomResizedCrop + flip +
      ToTensor + Normalize in the workers), same workers, same model settings

every row bf16 autocast + channels_last unless it says otherwise, driven through `train run`'s
own step loop (bench/gpu_measure.py says how), warm-up intervals excluded. Inputs are built
where it runs: bench/fixture.py's real-photo fixture, then `prep build-lmdb --size 160 --size
320`, cached under --cache. Then a projection of phases/*.json's training time from the rates.

    python bench/gpu.py [--sizes 128,160,224,288] [--archs resnet50,resnet18] [--configs a,b,c,d]
                        [--budget-seconds 450] [--json-out r.json]
    python bench/gpu.py --tiny            # CPU smoke: resnet18, 32/64 px, batch 8, seconds

docs/GPU_RUN.md has the device-machine command (wheels for lmdb/PyTurboJPEG, carried photos).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))

import gpu_inputs  # noqa: E402  (bench/gpu_inputs.py)
from gpu_report import (  # noqa: E402
    CONFIG_TITLES,
    add_ratios,
    default_batch_size,
    format_projection,
    format_table,
    prep_size_for,
    project,
)

SCHEDULES = ("phases/imagenet18-1x8.json", "phases/rn50-16ep.json")
PREP_SIZES = (160, 320)
NEEDS_SECONDS = {False: 10.0, True: 150.0}  # least budget left to start an eager / compiled row
TINY = {
    "archs": "resnet18",
    "sizes": "32,64",
    "arch_sizes": "",
    "compile_sizes": "32,64",
    "steps": 2,
    "warmup": 1,
    "log_every": 1,
    "batch_size": 8,
    "fixture_images": 64,
    "fixture_classes": 4,
    "workers": 1,
    "budget_seconds": 240.0,
    "config_seconds": 20.0,
    "photos": "synthetic",
    "optimizer_rows": False,  # minutes on a CPU; time_optimizers has its own tests
}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--device", default="auto", choices=("auto", "cuda", "cpu"))
    add(
        "--sizes",
        default="128,160,224,288",
        help="crop sides (px) of every arch not in --arch-sizes",
    )
    add("--archs", default="resnet50,resnet18", help="the first also gets the fp16/compile rows")
    add("--arch-sizes", default="resnet18=128,160", help="per-arch crop sides: ARCH=S,S[;ARCH=S]")
    add(
        "--configs",
        default="a,b,c,d",
        help="subset of a (synthetic), b (ours CPU decode), "
        "c (ours GPU decode), d (ImageFolder+PIL)",
    )
    add(
        "--variants", default="fp16,compile", help="extra (a) rows of the first arch: fp16, compile"
    )
    add(
        "--compile-sizes",
        default="128,224",
        help="crop sides of the compile rows (each compiles ~1 min)",
    )
    add(
        "--steps",
        type=int,
        default=60,
        help="timed steps per row (fewer if --config-seconds runs out)",
    )
    add("--warmup", type=int, default=20, help="untimed steps first (rounded up to --log-every)")
    add("--log-every", type=int, default=20, help="steps between host syncs (train run's default)")
    add(
        "--batch-size",
        type=int,
        help="per GPU, every row (default: 256 up to 160 px, 192 at 224, 128 above)",
    )
    add("--fixture-images", type=int, default=2000)
    add("--fixture-classes", type=int, default=20)
    add(
        "--fixture-dir",
        type=Path,
        help="use this fixture (bench/fixture.py layout) instead of building one",
    )
    add(
        "--wallpaper-dir",
        type=Path,
        help="the fixture's source photos, where /usr/share/wallpapers is missing",
    )
    add(
        "--photos",
        choices=("real", "synthetic"),
        default="real",
        help="fixture images: real photos (bench/fixture.py) or prep sample's generated ones "
        "(--tiny's)",
    )
    add(
        "--export-sources",
        type=Path,
        help="copy the fixture's source photos to this folder and exit",
    )
    add("--workers", type=int, help="loader processes of (b), (c), (d) (default: all usable cores)")
    add(
        "--budget-seconds",
        type=float,
        default=450.0,
        help="whole run, inputs included; rows past it are skipped",
    )
    add("--config-seconds", type=float, default=15.0, help="longest timed window of one row")
    add("--cache", type=Path, default=HERE / ".cache" / "gpu")
    add("--schedules", default=",".join(SCHEDULES), help="phases files to project")
    add("--json-out", type=Path, help="results as JSON, rewritten after every row")
    add(
        "--optimizer-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="`train bench --optimizers`' rows last: the first arch at the first size, synthetic",
    )
    add(
        "--tiny",
        action="store_true",
        help="CPU smoke: " + ", ".join(f"{k}={v}" for k, v in TINY.items()),
    )
    if "--tiny" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**TINY)  # what --tiny changes; flags given explicitly still win
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = usable_cores()
    round_up = lambda n: -(-n // args.log_every) * args.log_every  # noqa: E731
    args.warmup, args.steps = round_up(max(args.warmup, 1)), round_up(max(args.steps, 1))
    unknown = set(_split(args.configs)) - set(CONFIG_TITLES)
    if unknown or args.log_every < 1 or args.workers < 0:
        parser.error(
            f"--configs from a,b,c,d (got {sorted(unknown)}); --log-every >= 1; --workers >= 0"
        )
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def plan(args: argparse.Namespace) -> list[dict]:
    """Every row, in the order they run (the ones the targets need first; compile last)."""
    configs, archs = _split(args.configs), _split(args.archs)
    per_arch = dict(item.split("=", 1) for item in args.arch_sizes.split(";") if "=" in item)
    variants = _split(args.variants)

    def row(config, arch, crop_size, precision="bf16", compile=False):
        return {
            "config": config,
            "arch": arch,
            "crop_size": crop_size,
            "precision": precision,
            "compile": compile,
            "batch_size": args.batch_size or default_batch_size(crop_size),
        }

    rows = [
        row(c, arch, int(s))
        for arch in archs
        for s in _split(per_arch.get(arch, args.sizes))
        for c in configs
    ]
    if archs and "a" in configs:
        if "fp16" in variants:
            rows += [row("a", archs[0], int(s), "fp16") for s in _split(args.sizes)]
        if "compile" in variants:
            rows += [row("a", archs[0], int(s), compile=True) for s in _split(args.compile_sizes)]
    return rows


def skip_reason(row: dict, cuda: bool, args: argparse.Namespace) -> str | None:
    if not cuda and row["config"] == "c":
        return "skipped: no CUDA (GPU decode needs nvJPEG)"
    if not cuda and row["precision"] == "fp16":
        return "skipped: no CUDA (fp16 autocast needs it)"
    if not cuda and row["compile"] and args.tiny:
        return "skipped: compile on CPU takes minutes; not run with --tiny"
    return None


def machine_line(cuda: bool) -> str:
    import platform

    import torch
    import torchvision

    from train.bench.loader import machine_description

    gpu = "no CUDA (CPU run)"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu = (
            f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} "
            f"GiB, CUDA {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}"
        )
    return (
        f"{gpu} | {machine_description()} | torchvision {torchvision.__version__}, "
        f"python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.export_sources:
        copied = gpu_inputs.export_sources(args.export_sources)
        print(f"copied {len(copied)} source photos to {args.export_sources}")
        return 0
    from gpu_measure import Inputs

    from train.engine.dist import resolve_device
    from train.plan.phases import load_schedule

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    rows = plan(args)
    sizes = sorted(
        {prep_size_for(r["crop_size"], PREP_SIZES) for r in rows if r["config"] in ("b", "c")}
    )
    if args.fixture_dir:
        fixture_dir, record = args.fixture_dir, gpu_inputs.existing_fixture(args.fixture_dir)
    else:
        fixture_dir = args.cache / f"fixture-{args.photos}-{args.fixture_images}"
        record = gpu_inputs.build_inputs_fixture(
            fixture_dir, args.fixture_images, args.fixture_classes, args.wallpaper_dir, args.photos
        )
    num_images = record["stats"]["count"]
    shard_dirs = (
        gpu_inputs.build_shards(
            fixture_dir,
            args.cache / f"shards-{fixture_dir.name}",
            sizes,
            num_images,
            0 if args.tiny else args.workers,
        )
        if sizes
        else {}
    )
    out = {
        "machine": machine_line(cuda),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "fixture": {"dir": str(fixture_dir), **record["stats"]},
        "rows": rows,
        "seconds_inputs": time.perf_counter() - started,
    }
    print(f"machine: {out['machine']}")
    print(
        f"fixture: {num_images} JPEGs in {fixture_dir}; shards {sorted(shard_dirs)}; "
        f"inputs ready in {out['seconds_inputs']:.0f} s"
    )
    print(
        f"settings: {args.workers} loader workers, warm-up {args.warmup} + up to {args.steps} "
        "timed "
        f"steps (<= {args.config_seconds:g} s) per row, a host sync every {args.log_every} steps, "
        f"budget {args.budget_seconds:g} s",
        flush=True,
    )
    recipe = dict(load_schedule(HERE.parent / SCHEDULES[0]).recipe)
    recipe.pop("tuned_num_gpus", None)  # a one-GPU bench: no note about 8-GPU LRs per row
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        inputs = Inputs(
            device.type,
            args.workers,
            shard_dirs,
            fixture_dir / "folders" / "train",
            recipe,
            args.warmup,
            args.steps,
            args.log_every,
            Path(scratch),
        )
        for row in rows:
            run_row(row, inputs, args, cuda, started)
            add_ratios(rows)
            write_json(args.json_out, out, started)
    projections = [project(Path(path), rows, root=HERE.parent) for path in _split(args.schedules)]
    out["projection"] = projections
    order = {key: i for i, key in enumerate(("a", "b", "c", "d"))}
    shown = sorted(
        rows,
        key=lambda r: (
            r["arch"] != rows[0]["arch"],
            r["arch"],
            r["crop_size"],
            order[r["config"]],
            r["compile"],
            r["precision"] != "bf16",
        ),
    )
    print(f"\nmachine: {out['machine']}\n{format_table(add_ratios(shown))}\n")
    print(format_projection(projections))
    if args.optimizer_rows:
        out["optimizers"] = optimizer_rows(args, device, recipe, started)
    write_json(args.json_out, out, started)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def run_row(row: dict, inputs, args, cuda: bool, started: float) -> None:
    """Measure one row in place; a skip or a failure becomes its note, never the run's end."""
    from gpu_measure import Job, measure

    left = args.budget_seconds - (time.perf_counter() - started)
    reason = skip_reason(row, cuda, args)
    if reason is None and left < NEEDS_SECONDS[row["compile"]]:
        reason = f"skipped: time budget ({left:.0f} s of {args.budget_seconds:g} s left)"
    prep_size = prep_size_for(row["crop_size"], PREP_SIZES)
    row.update(
        decode={"b": "cpu", "c": "gpu"}.get(row["config"]),
        train_dir=f"train-{prep_size}" if row["config"] in ("b", "c") else None,
        workers=inputs.workers if row["config"] != "a" else 0,
    )
    if reason is not None:
        row["note"] = reason
    else:
        job = Job(
            row["config"],
            row["arch"],
            row["crop_size"],
            row["batch_size"],
            row["precision"],
            row["compile"],
        )
        try:
            row.update(measure(job, inputs, prep_size, min(args.config_seconds, max(left - 5, 1))))
            row["note"] = f"{row['steps_measured']} steps" + (
                f" from {row['train_dir']}" if row["train_dir"] else ""
            )
        except Exception as err:  # noqa: BLE001  (one bad row must not lose the others' numbers)
            traceback.print_exc()
            row["note"] = (
                f"failed: {type(err).__name__}: "
                f"{str(err).splitlines()[0][:120] if str(err) else ''}"
            )
    rate = (
        f"{row['img_per_s']:,.0f} img/s, data-wait {100 * row['data_wait']:.0f}%"
        if "img_per_s" in row
        else ""
    )
    print(
        f"  {CONFIG_TITLES[row['config']]:<22} {row['arch']:<9} {row['crop_size']:>3} px "
        f"{row['precision']}{' compile' if row['compile'] else ''}: {rate or row['note']}",
        flush=True,
    )


def optimizer_rows(args, device, recipe: dict, started: float) -> list[dict]:
    """`train bench --optimizers`' rows (each optimizer's step time against SGD's)."""
    from train.bench.optim import format_optimizer_rows, time_optimizers
    from train.bench.phases import BenchConfig
    from train.plan.config import Recipe

    left = args.budget_seconds - (time.perf_counter() - started)
    if left < 60:
        print(f"\noptimizer rows skipped: time budget ({left:.0f} s left)")
        return []
    arch, crop_size = _split(args.archs)[0], int(_split(args.sizes)[0])
    batch_size = args.batch_size or default_batch_size(crop_size)
    precision = "bf16" if device.type == "cuda" else "fp32"
    config = BenchConfig(HERE.parent / SCHEDULES[0], steps=args.steps, warmup_steps=args.warmup)
    rows = time_optimizers(
        config,
        Recipe.from_mapping(recipe, arch=arch),
        batch_size,
        crop_size,
        1000,
        device,
        precision,
    )
    setting = f"{arch}, batch {batch_size} x {crop_size} px, {precision}, synthetic"
    print("\n" + format_optimizer_rows(setting, rows))
    return rows


def write_json(path: Path | None, out: dict, started: float) -> None:
    if path is not None:
        out["seconds_total"] = time.perf_counter() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())

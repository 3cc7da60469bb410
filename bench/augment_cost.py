"""Each training augmentation's cost in loader img/s (issue 18): `train bench-loader` with and
without it, interleaved round by round (a shared machine drifts), at 128 px from train-160 and
224 px from train-320 shards.

    python bench/augment_cost.py --shards DIR [--rounds 3] [--json-out r.json]
    python bench/augment_cost.py --shards DIR --set auto_augment  # timm's RandAugment vs "ra"

DIR holds train-160/ and train-320/ (e.g. `prep build-lmdb --src <fixture>/archives --out DIR
--size 160 --size 320` over bench/fixture.py's photos). ColorJitter and random erasing are drawn
in the loader's workers and applied by the prefetcher on the device: "drawn" rows are the
loader's cost (a GPU machine's CPU side), the --prefetch rows add the prefetcher's work on the
CPU (normalising, jitter, erasing: what a CPU-only run pays), against --prefetch alone.
`--set auto_augment`: RSB A3's "timm:rand-m6-mstd0.5-inc1" against torchvision's "ra", both per
image in worker processes, at RSB A3's 160 px crop from train-320.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARDS_BY_CROP = {128: "train-160", 160: "train-320", 224: "train-320"}
# (name, bench-loader options, the name of its baseline)
BOTH = ["--color-jitter", "0.4", "--random-erasing", "0.25"]
OPS_VARIANTS = (
    ("uint8", [], None),
    ("jitter+erasing drawn", BOTH, "uint8"),
    ("repeat_aug 3", ["--repeat-aug", "3"], "uint8"),
    ("prefetch", ["--prefetch"], None),
    ("prefetch color_jitter 0.4", ["--prefetch", "--color-jitter", "0.4"], "prefetch"),
    ("prefetch random_erasing 0.25", ["--prefetch", "--random-erasing", "0.25"], "prefetch"),
)
RSB_AUGMENT = "timm:rand-m6-mstd0.5-inc1"
AUTO_AUGMENT_VARIANTS = (
    ("auto_augment ra", ["--auto-augment", "ra"], None),
    (f"auto_augment {RSB_AUGMENT}", ["--auto-augment", RSB_AUGMENT], "auto_augment ra"),
)
# --set: (variants, crop sizes)
VARIANT_SETS = {"ops": (OPS_VARIANTS, (128, 224)), "auto_augment": (AUTO_AUGMENT_VARIANTS, (160,))}


def measure(shards: Path, crop_size: int, options: list[str], args) -> dict:
    """One bench-loader run in a fresh process: {img_per_s, cpu_ms_per_img}."""
    command = [
        sys.executable,
        __file__,
        "--child",
        json.dumps([str(shards / SHARDS_BY_CROP[crop_size]), crop_size, options]),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--batches",
        str(args.batches),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(spec: str, args) -> None:
    """img/s of the timed batches, and CPU ms per image of everything after the imports: this
    process's threads plus its worker processes (reaped when the loader closes), which a busy
    shared machine disturbs far less than wall time."""
    import resource

    import torch

    from train.bench.loader import bench_loader
    from train.data.augment import Augmentation

    data, crop_size, options = json.loads(spec)
    flags = argparse.ArgumentParser()  # bench-loader's augmentation options
    flags.add_argument("--color-jitter", type=float, default=0.0)
    flags.add_argument("--random-erasing", type=float, default=0.0)
    flags.add_argument("--repeat-aug", type=int, default=1)
    flags.add_argument("--prefetch", action="store_true")
    flags.add_argument("--auto-augment")
    chosen = flags.parse_args(options)
    augment = Augmentation(
        auto_augment=chosen.auto_augment,
        color_jitter=chosen.color_jitter,
        random_erasing=chosen.random_erasing,
        repeat_aug=chosen.repeat_aug,
    )

    def cpu_seconds() -> float:
        own, children = (
            resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    # One torch thread in this process, as `train run --threads 1`: on this oversubscribed 2-core
    # machine torch's default two intra-op threads made the prefetcher's float ops ~10x slower.
    torch.set_num_threads(1)
    started = cpu_seconds()
    result = bench_loader(
        Path(data),
        crop_size,
        args.batch_size,
        args.workers,
        args.batches,
        warmup_batches=5,
        augment=augment,
        prefetch=chosen.prefetch,
    )
    images = (args.batches + 5) * args.batch_size  # the warm-up batches cost CPU too
    cpu_ms = 1000 * (cpu_seconds() - started) / images
    print(json.dumps({"img_per_s": result["img_per_s"], "cpu_ms_per_img": cpu_ms}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--set", choices=sorted(VARIANT_SETS), default="ops")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args)
        return 0
    if args.shards is None:
        parser.error("--shards is required")
    variants, crop_sizes = VARIANT_SETS[args.set]
    runs: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for crop_size in crop_sizes:
            for name, options, _ in variants:
                run = measure(args.shards, crop_size, options, args)
                runs.setdefault(f"{crop_size}/{name}", []).append(run)
                print(
                    f"round {round_index} {crop_size} px {name}: {run['img_per_s']:,.0f} img/s, "
                    f"{run['cpu_ms_per_img']:.3f} CPU ms/img",
                    flush=True,
                )
    print(
        "| crop | variant | img/s per round | CPU ms/img per round | img/s vs baseline "
        "(medians; per-round range) | CPU ms/img vs baseline (medians; per-round range) |"
    )
    print("|---|---|---|---|---|---|")
    for crop_size in crop_sizes:
        for name, _, baseline in variants:
            mine = runs[f"{crop_size}/{name}"]
            cells = [str(crop_size), name]
            for key in ("img_per_s", "cpu_ms_per_img"):
                cells.append(
                    ", ".join(
                        f"{r[key]:,.0f}" if key == "img_per_s" else f"{r[key]:.2f}" for r in mine
                    )
                )
            for key in ("img_per_s", "cpu_ms_per_img"):
                if baseline is None:
                    cells.append("baseline")
                    continue
                base = runs[f"{crop_size}/{baseline}"]
                per_round = [a[key] / b[key] for a, b in zip(mine, base)]
                median = statistics.median(r[key] for r in mine) / statistics.median(
                    r[key] for r in base
                )
                cells.append(
                    f"{median:.2f} ({min(per_round):.2f}-{max(per_round):.2f}) of {baseline}"
                )
            print("| " + " | ".join(cells) + " |")
    if args.json_out:
        record = {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        }
        args.json_out.write_text(json.dumps({"args": record, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

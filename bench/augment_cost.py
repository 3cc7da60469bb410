"""Each training augmentation's cost in loader img/s (issue 18): `train bench-loader` with and
without it, interleaved round by round (a shared machine drifts), at 128 px from train-160 and
224 px from train-320 shards.

    python bench/augment_cost.py --shards DIR [--rounds 3] [--json-out r.json]

DIR holds train-160/ and train-320/ (e.g. `prep build-lmdb --src <fixture>/archives --out DIR
--size 160 --size 320` over bench/fixture.py's photos). Random erasing runs on the normalised
batch, so it is compared against --normalize alone (normalising to float on the CPU, as the
prefetcher does on the GPU); the others against the plain uint8 loader.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {128: "train-160", 224: "train-320"}
# (name, bench-loader options, the name of its baseline)
VARIANTS = (
    ("uint8", [], None),
    ("color_jitter 0.4", ["--color-jitter", "0.4"], "uint8"),
    ("repeat_aug 3", ["--repeat-aug", "3"], "uint8"),
    ("normalize", ["--normalize"], None),
    ("random_erasing 0.25", ["--normalize", "--random-erasing", "0.25"], "normalize"),
)


def img_per_s(shards: Path, crop_size: int, options: list[str], args) -> float:
    command = [
        sys.executable,
        "-m",
        "train",
        "bench-loader",
        "--data",
        str(shards / SIZES[crop_size]),
        "--crop-size",
        str(crop_size),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--batches",
        str(args.batches),
        *options,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1].split("=", 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        for crop_size in SIZES:
            for name, options, _ in VARIANTS:
                rate = img_per_s(args.shards, crop_size, options, args)
                rates.setdefault(f"{crop_size}/{name}", []).append(rate)
                print(f"round {round_index} {crop_size} px {name}: {rate:,.0f} img/s", flush=True)
    print("| crop | variant | img/s per round | median | vs baseline (median; per-round range) |")
    print("|---|---|---|---|---|")
    for crop_size in SIZES:
        for name, _, baseline in VARIANTS:
            runs = rates[f"{crop_size}/{name}"]
            ratio = "baseline"
            if baseline is not None:
                base = rates[f"{crop_size}/{baseline}"]
                per_round = [a / b for a, b in zip(runs, base)]
                ratio = (
                    f"{statistics.median(runs) / statistics.median(base):.2f} "
                    f"({min(per_round):.2f}-{max(per_round):.2f}) of {baseline}"
                )
            row = ", ".join(f"{r:,.0f}" for r in runs)
            print(f"| {crop_size} | {name} | {row} | {statistics.median(runs):,.0f} | {ratio} |")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "args": vars(args)
                    | {"shards": str(args.shards), "json_out": str(args.json_out)},
                    "img_per_s": rates,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

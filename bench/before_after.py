"""Did a change cost speed? `train bench` (synthetic, the model's step rate) and `train
bench-loader` (the loader's img/s) of two checkouts of this repo, interleaved in one run:

    python bench/before_after.py --before /path/to/old/checkout [--after .] --data D/train-160
                                 [--repeats 5] [--phases phases/demo.json] [--json-out r.json]

Each repeat runs both commands in both trees, alternating which goes first, each in its own
process with its tree as the working directory (so each imports its own `train`). Reports
absolute img/s per tree and the median (and range) of the per-repeat ratios after / before:
this machine's speed drifts within a minute, and the ratio of neighbouring runs drifts least.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from train.bench_loader import machine_description  # noqa: E402


def bench_synthetic(tree: Path, args) -> float:
    """Mean synthetic img/s over the distinct phases of `train bench` (no data: model only)."""
    out = run(tree, ["bench", "--phases", str(args.phases), "--device", "cpu", "--steps",
                     str(args.steps), "--warmup", str(args.warmup)])
    lines = out.strip().splitlines()
    rates = [float(re.split(r"\s{2,}", line.strip())[4].replace(",", "")) for line in lines[1:]]
    return statistics.fmean(rates)


def bench_loader(tree: Path, args) -> float:
    out = run(tree, ["bench-loader", "--data", str(args.data), "--crop-size", "128",
                     "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                     "--batches", str(args.batches)])
    return float(out.strip().splitlines()[-1].split("=", 1)[1])


def run(tree: Path, argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "train", *argv], cwd=tree, capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"{tree}: train {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=HERE.parent)
    parser.add_argument("--data", type=Path, required=True, help="a train-<N>/ shard directory")
    parser.add_argument("--phases", type=Path, default=Path("phases/demo.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    print(f"machine: {machine_description()}")
    results = {name: {"synthetic": [], "loader": []} for name in trees}
    for repeat in range(args.repeats):
        order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
        for kind, measure in (("synthetic", bench_synthetic), ("loader", bench_loader)):
            for name in order:
                results[name][kind].append(measure(trees[name], args))
        print(f"repeat {repeat}: " + "; ".join(
            f"{kind} before {results['before'][kind][-1]:,.1f} after {results['after'][kind][-1]:,.1f}"
            f" img/s" for kind in ("synthetic", "loader")), flush=True)
    report = {"machine": machine_description(), "trees": {k: str(v) for k, v in trees.items()},
              "settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    for kind, title in (("synthetic", "train bench, synthetic (model step rate)"),
                        ("loader", "train bench-loader, 128 px from the shards")):
        ratios = [a / b for a, b in zip(results["after"][kind], results["before"][kind])]
        report[f"{kind}_ratio"] = ratios
        print(f"{title}: before {statistics.median(results['before'][kind]):,.1f} img/s, after "
              f"{statistics.median(results['after'][kind]):,.1f} img/s (medians); after / before "
              f"{summary(ratios)}")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Did a change cost speed? `train bench` (synthetic, the model's step rate), `train
bench-loader` (the loader's img/s) and `prep build-lmdb` (one worker) of two checkouts of this
repo, interleaved in one run:

    python bench/before_after.py --before /path/to/old/checkout [--after .] --data D/train-160
                                 [--repeats 5] [--phases phases/demo.json] [--json-out r.json]
    python bench/before_after.py --before OLD --prep-src FIXTURE/archives --kinds prep,loader

With --prep-src, each tree builds its own sz/160 LMDB from the same source every repeat (img/s
from the tool's own seconds, and CPU seconds of its process tree per image: robust to other load
on the machine, unlike wall time), and its loader reads what it built (two checkouts may differ
in FORMAT_VERSION).

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
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from proctree import children_cpu_seconds  # noqa: E402  (bench/proctree.py)

from train.bench.loader import machine_description  # noqa: E402


def bench_synthetic(tree: Path, args) -> float:
    """Mean synthetic img/s over the distinct phases of `train bench` (no data: model only)."""
    out = run(
        tree,
        [
            "bench",
            "--phases",
            str(args.phases),
            "--device",
            "cpu",
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ],
    )
    lines = out.strip().splitlines()
    rates = [float(re.split(r"\s{2,}", line.strip())[4].replace(",", "")) for line in lines[1:]]
    return statistics.fmean(rates)


def bench_loader(tree: Path, args) -> float:
    data = args.data or args.scratch / tree.name / "train-160"
    out = run(
        tree,
        [
            "bench-loader",
            "--data",
            str(data),
            "--crop-size",
            "128",
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--batches",
            str(args.batches),
        ],
    )
    return float(out.strip().splitlines()[-1].split("=", 1)[1])


def bench_prep(tree: Path, args) -> float:
    """img/s of `prep build-lmdb --size 160 --workers 1` from the tool's own seconds; also keeps
    the CPU seconds per image of its whole process tree in args.prep_cpu[tree]."""
    started = children_cpu_seconds()
    out = run(
        tree,
        [
            "build-lmdb",
            "--src",
            str(args.prep_src),
            "--out",
            str(args.scratch / tree.name),
            "--split",
            "train",
            "--size",
            "160",
            "--workers",
            "1",
            "--overwrite",
            "-q",
        ],
        tool="prep.cli",
    )
    images, seconds = re.search(r"([\d,]+) images in ([\d.]+) s", out).groups()
    images = int(images.replace(",", ""))
    args.prep_cpu.setdefault(str(tree), []).append(
        (children_cpu_seconds() - started) / images * 1e3
    )
    return images / float(seconds)


def run(tree: Path, argv: list[str], tool: str = "train") -> str:
    result = subprocess.run(
        [sys.executable, "-m", tool, *argv], cwd=tree, capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise SystemExit(f"{tree}: {tool} {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=HERE.parent)
    parser.add_argument(
        "--data",
        type=Path,
        help="a train-<N>/ shard directory (default: each tree's --prep-src build)",
    )
    parser.add_argument(
        "--prep-src", type=Path, help="a prep source (e.g. bench/fixture.py's archives/)"
    )
    parser.add_argument(
        "--kinds", default="synthetic,loader", help="comma list of synthetic, loader, prep"
    )
    parser.add_argument("--phases", type=Path, default=Path("phases/demo.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    # prep builds the loader's data
    kinds = [k for k in ("prep", "synthetic", "loader") if k in args.kinds.split(",")]
    if ("prep" in kinds) != bool(args.prep_src) or (
        "loader" in kinds and not (args.data or args.prep_src)
    ):
        parser.error("--kinds prep needs --prep-src; loader needs --data or --prep-src")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    if trees["before"].name == trees["after"].name:
        parser.error(
            "the two checkouts need different directory names (their builds go to scratch/<name>)"
        )
    measures = {"prep": bench_prep, "synthetic": bench_synthetic, "loader": bench_loader}
    args.prep_cpu = {}
    print(f"machine: {machine_description()}")
    results = {name: {kind: [] for kind in kinds} for name in trees}
    with tempfile.TemporaryDirectory(prefix="before-after-") as scratch:
        args.scratch = Path(scratch)
        for repeat in range(args.repeats):
            order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
            for kind in kinds:
                for name in order:
                    results[name][kind].append(measures[kind](trees[name], args))
            print(
                f"repeat {repeat}: "
                + "; ".join(
                    f"{kind} before {results['before'][kind][-1]:,.1f} after "
                    f"{results['after'][kind][-1]:,.1f} img/s"
                    for kind in kinds
                ),
                flush=True,
            )
    report = {
        "machine": machine_description(),
        "trees": {k: str(v) for k, v in trees.items()},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "prep_cpu_ms_per_image": args.prep_cpu,
    }
    titles = {
        "prep": "prep build-lmdb --size 160 --workers 1",
        "synthetic": "train bench, synthetic (model step rate)",
        "loader": "train bench-loader, 128 px from the shards",
    }
    for kind in kinds:
        title = titles[kind]
        ratios = [a / b for a, b in zip(results["after"][kind], results["before"][kind])]
        report[f"{kind}_ratio"] = ratios
        print(
            f"{title}: before {statistics.median(results['before'][kind]):,.1f} img/s, after "
            f"{statistics.median(results['after'][kind]):,.1f} img/s (medians); after / before "
            f"{summary(ratios)}"
        )
    if args.prep_cpu:
        before, after = (args.prep_cpu[str(trees[name])] for name in ("before", "after"))
        print(
            f"prep CPU ms per image (whole process tree): before {statistics.median(before):.3f}, "
            f"after {statistics.median(after):.3f}; after / before "
            f"{summary([a / b for a, b in zip(after, before)])}"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Full-size rehearsal: prep, verify and the training side's start-up on an archive with
ImageNet's exact counts and layout (bench/scale_archive.py: 1,000 class tars, 1,281,167 train +
50,000 val members, devkit) of small real-photo crops.

    python bench/scale.py --data /work/data/h3/scale STEP [STEP ...]
    python bench/scale.py --data /tmp/tiny --scale 0.001 --photos synthetic all   # the tests' tiny mode

Steps (each saves its results in DATA/results.json, so they can run as separate commands):
  generate    write the archives (reused when they match --scale and --seed)
  prep        prep build-msgpack of train and of val: img/s over time, peak RSS and open files of
              the whole process tree, the main process's CPU per image
  profile     cProfile of the build's main process (the sequential part) over one part of 20
  verify      prep verify of both datasets (every record decoded), and --source for val
  train       dataset open, an epoch's sampler plan for 1, 8 and 64 ranks, rect-val batching of
              the val set, a loader's epoch start (first batch), `train run --dry-run`
  parts       a 2-rank torchrun build + merge of train against the single build (equality checked
              file by file, then prep verify); the single build's store is deleted first (disk)
  report      the table of results and the projection for real ImageNet on 16 cores
  all         every step in that order
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # after bench/: the repo's `prep` package, not bench/prep.py

import scale_archive  # noqa: E402
import scale_steps  # noqa: E402
from scale_report import format_report  # noqa: E402

STEPS = ("generate", "prep", "profile", "verify", "train", "parts", "report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="+", choices=STEPS + ("all",))
    parser.add_argument("--data", type=Path, required=True, help="working directory (archives, shards, results)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ImageNet's counts (1 = full size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=75,
                        help="--quality of the rehearsal builds (75: the shards of ~7 KB crops fit the disk twice)")
    parser.add_argument("--workers", type=int, default=None, help="prep workers (default: all cores)")
    parser.add_argument("--photos", choices=("real", "synthetic"), default="real",
                        help="real: the wallpaper photos (`make bench` installs them); synthetic: generated gradients")
    parser.add_argument("--prep-json", type=Path, help="bench/prep.py --json-out results: per-core rates for the projection")
    args = parser.parse_args(argv)
    steps = STEPS if "all" in args.steps else args.steps
    results_path = args.data / "results.json"
    args.data.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["machine"] = scale_steps.machine()
    rehearsal = scale_steps.Rehearsal(args.data, args.quality, args.workers)
    for step in steps:
        started = time.perf_counter()
        if step == "generate":
            results["generate"] = scale_archive.generate(rehearsal.src_dir, args.scale, args.seed,
                                                         photos=args.photos)
        elif step == "report":
            print(format_report(results, json.loads(args.prep_json.read_text()) if args.prep_json else None))
        else:
            results[step] = getattr(rehearsal, f"run_{step}")()
        print(f"[scale] {step}: {time.perf_counter() - started:.1f} s", flush=True)
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training loaders side by side with FFCV and DALI (issue 10), on the same real-photo records as
bench/loader.py: RandomResizedCrop + flip, uint8 batches, the same workers/threads for all.

  train128: 128 px crops of train-160 (our shard; FFCV's .beton and DALI's files of its records)
  train224: 224 px crops of train-320
  loaders:  ours (TrainLoader as it runs by default: worker threads, native decoder),
            ours-processes (the native decoder in worker processes), ours-python (the
            pure-Python fallback decoder, worker processes), ffcv (its default output: NCHW
            view of NHWC memory), ffcv-contiguous (ToTorchImage(channels_last=False)), dali
            (CPU pipeline, device_id=None, NHWC)
  floors:   decode-only (bench/decode_floor.py), one thread: "floor" = the whole image at the
            loader's DCT scale, "floor-region" = only the crop's region, as the loader decodes,
            "floor-pyturbojpeg" = PyTurboJPEG's full decode; "floor-threads" = "floor" in as
            many threads as the loaders' workers (per core: img/s / threads)

    python bench/loader_peers.py [--rounds 3] [--windows 40,200] [--groups train128,train224]

Every loader runs in its own process (peers under bench/setup_peers.sh's venv) and stays up for
the whole group; each round times, per loader in a rotating order, one window of each length
after WARMUP_BATCHES untimed batches (what it prefetched while the others ran is thrown away).
Ratios are taken per round, reported as the median and range. Per core = img/s / workers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import decode_floor  # noqa: E402
import fixture  # noqa: E402
import loader_baselines as base  # noqa: E402
import peer_servers as servers  # noqa: E402

from train.bench.loader import machine_description  # noqa: E402

GROUPS = {"train128": (160, 128), "train224": (320, 224)}  # group: (prep_size, crop_size)
DEFAULT_LOADERS = ("ours", "ours-processes", "ffcv", "ffcv-contiguous")
RATIOS = [  # (label, numerator, denominator, target)
    ("ours vs FFCV default", "ours", "ffcv", ">= 1.3"),
    ("ours vs FFCV contiguous", "ours", "ffcv-contiguous", ">= 1.8"),
    ("ours per core vs decode floor", "ours", "floor", ">= 0.75"),
    ("ours per core vs region floor", "ours", "floor-region", ""),
    ("ours per core vs floor, same threads", "ours", "floor-threads", ""),
    ("ours vs ours-processes", "ours", "ours-processes", ""),
    ("ours vs ours-python", "ours", "ours-python", ""),
    ("ours vs DALI", "ours", "dali", ""),
    ("ours-processes vs FFCV default", "ours-processes", "ffcv", ""),
]
# (name in a round, decode_floor kind, threads: 0 = as many as the loaders' workers)
FLOOR_RUNS = (
    ("floor", "full", 1),
    ("floor-region", "region", 1),
    ("floor-pyturbojpeg", "pyturbojpeg", 1),
    ("floor-threads", "full", 0),
)
FLOORS = tuple(name for name, _, _ in FLOOR_RUNS)


def per_core(result: dict) -> float:
    return result["images"] / result["seconds"] / max(1, result.get("workers", 1))


def per_cpu_second(result: dict) -> float:
    return result["images"] / max(result["cpu_seconds"], 1e-9)


def start_servers(names, inputs: Path, store_dir: Path, crop_size: int, args, python) -> dict:
    """{name: ready Server | str why skipped}; the peers' formats are made here once."""
    out: dict = {}
    for name in names:
        if name in servers.PEER_LOADERS:
            if python is None:
                out[name] = servers.peers_python(args.peers_python)[1]
                continue
            module = "nvidia.dali" if name == "dali" else "ffcv"
            if not servers.peer_has(python, module):
                out[name] = f"skipped: {module} does not import in {python}"
                continue
            data = (
                inputs
                if name == "dali"
                else servers.ffcv_dataset(python, inputs, args.cache_dir, args.workers)
            )
        else:
            data = store_dir
        server = servers.start(
            name, data, crop_size, args.batch_size, args.workers, args.log_dir, python
        )
        if server.ready():
            out[name] = server
            print(f"  {name}: ready {json.dumps(server.facts)}", flush=True)
        else:
            server.close()
            out[name] = f"failed: {server.error}"
            print(f"  {name}: {out[name]}", flush=True)
    return out


def run_group(group: str, args, python) -> dict:
    prep_size, crop_size = GROUPS[group]
    store_dir = args.shards / f"train-{prep_size}"
    inputs = servers.prepare_inputs(store_dir, args.cache_dir)
    print(
        f"\n{group}: {crop_size} px RandomResizedCrop+flip from sz/{prep_size}, starting loaders",
        flush=True,
    )
    running = start_servers(args.loaders, inputs, store_dir, crop_size, args, python)
    live = [name for name, server in running.items() if not isinstance(server, str)]
    jobs = decode_floor.floor_jobs(store_dir, crop_size)
    rounds = []
    try:
        for number in range(args.rounds):
            order = live[number % len(live) :] + live[: number % len(live)] if live else []
            this = {}
            for name in order:
                this[name] = {
                    str(n): running[name].window(batches=n, warmup=servers.WARMUP_BATCHES)
                    | {"workers": args.workers}
                    for n in args.windows
                }
            for name, kind, threads in FLOOR_RUNS:
                if kind not in decode_floor.kinds_available():
                    continue
                floor = decode_floor.time_floor(
                    jobs, args.floor_images, kind, threads or args.workers
                )
                this[name] = {str(n): floor for n in args.windows}
            rounds.append(this)
            print(
                f"  round {number + 1}: "
                + ", ".join(
                    f"{name} {per_core(this[name][str(args.windows[-1])]) * args.workers:.0f}"
                    for name in order
                )
                + ", "
                + ", ".join(
                    f"{name} {per_core(this[name][str(args.windows[0])]):.0f}"
                    for name in FLOORS
                    if name in this
                )
                + " img/s",
                flush=True,
            )
    finally:
        for server in running.values():
            if not isinstance(server, str):
                server.close()
    return {
        "rounds": rounds,
        "skipped": {k: v for k, v in running.items() if isinstance(v, str)},
        "facts": {k: v.facts for k, v in running.items() if not isinstance(v, str)},
        "floor_scales": decode_floor.scale_shares(jobs),
    }


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def report(group: str, result: dict, args) -> list[dict]:
    rounds, rows = result["rounds"], []
    names = [name for name in rounds[0] if name not in FLOORS] + [
        name for name in FLOORS if name in rounds[0]
    ]
    print(
        f"\n{group} ({len(rounds)} rounds; median (min-max); floor DCT scales "
        f"{result['floor_scales']})"
    )
    print(
        f"  {'loader':<18} {'window':>6} {'img/s':>18} {'per core':>7} {'img/CPU-s':>9} "
        f"{'RSS MiB':>8}"
    )
    for name in names:
        for window in list(rounds[0][name])[: 1 if name.startswith("floor") else None]:
            runs = [r[name][window] for r in rounds]
            rate = spread([r["images"] / r["seconds"] for r in runs])
            cpu = statistics.median(r["images"] / max(r["cpu_seconds"], 1e-9) for r in runs)
            rss = max(r.get("rss_mb", 0) for r in runs)
            label = "-" if name.startswith("floor") else window
            print(
                f"  {name:<18} {label:>6} {rate[0]:7.0f} ({rate[1]:.0f}-{rate[2]:.0f}) "
                f"{statistics.median(per_core(r) for r in runs):7.0f} {cpu:9.0f} {rss:8.0f}"
            )
    for name, why in result["skipped"].items():
        print(f"  {name:<18} {why}")
    print("  ratios, median (min-max) of per-round ratios: per core (wall) | per CPU-second")
    for label, top, bottom, target in RATIOS:
        if top not in rounds[0] or bottom not in rounds[0]:
            continue
        for window in map(str, args.windows):
            wall = spread([per_core(r[top][window]) / per_core(r[bottom][window]) for r in rounds])
            cpu = spread(
                [per_cpu_second(r[top][window]) / per_cpu_second(r[bottom][window]) for r in rounds]
            )
            rows.append(
                {
                    "group": group,
                    "ratio": label,
                    "window": int(window),
                    "per_core": wall,
                    "per_cpu_s": cpu,
                    "target": target,
                }
            )
            print(
                f"    {label:<34} {window:>4} batches {wall[0]:5.2f} "
                f"({wall[1]:.2f}-{wall[2]:.2f}) | "
                f"{cpu[0]:5.2f} ({cpu[1]:.2f}-{cpu[2]:.2f}){'  target ' + target if target else ''}"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--num-images", type=int, default=2000, help="fixture size (as bench/loader.py)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", default="40,200", help="timed window lengths in batches")
    parser.add_argument("--groups", default="train128,train224")
    parser.add_argument(
        "--loaders",
        default=",".join(DEFAULT_LOADERS),
        help=f"subset of {servers.OUR_LOADERS + servers.PEER_LOADERS}",
    )
    parser.add_argument(
        "--floor-images", type=int, default=4000, help="images decoded per floor measurement"
    )
    parser.add_argument(
        "--peers-python", type=Path, help="python of the peer venv (default bench/.peers-venv)"
    )
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    args.windows = [int(n) for n in args.windows.split(",") if n]
    args.loaders = [n for n in args.loaders.split(",") if n]
    groups = [g for g in args.groups.split(",") if g]
    if (
        set(groups) - set(GROUPS)
        or set(args.loaders) - set(servers.OUR_LOADERS + servers.PEER_LOADERS)
        or not args.windows
        or min(args.windows) < 1
        or args.rounds < 1
        or args.workers < 1
    ):
        parser.error("bad --groups, --loaders, --windows, --rounds or --workers")
    started = time.perf_counter()
    fixture_dir = args.cache / f"fixture-{args.num_images}"
    saved = fixture_dir / "fixture.json"
    stats = (
        json.loads(saved.read_text())
        if saved.is_file()
        else fixture.build_fixture(fixture_dir, args.num_images, 20, 0, quiet=True)
    )["stats"]
    args.cache_dir = base.cache_dir_for(fixture_dir)
    args.shards = base.our_shards(fixture_dir, args.cache_dir, (160, 320))["lmdb"]
    args.log_dir = args.cache_dir / "peer-logs"
    args.log_dir.mkdir(exist_ok=True)
    python, why = servers.peers_python(args.peers_python)
    print(f"machine: {machine_description()}")
    print(f"fixture: {stats['count']} real-photo JPEGs ({fixture_dir}); peers: {python or why}")
    print(
        f"settings: {args.workers} workers/threads, batch {args.batch_size}, {args.rounds} rounds "
        f"of windows {args.windows} batches, {servers.WARMUP_BATCHES} untimed batches before each"
    )
    results, ratio_rows = {}, []
    for group in groups:
        results[group] = run_group(group, args, python)
        ratio_rows += report(group, results[group], args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "machine": machine_description(),
                    "fixture": stats,
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                    "ratios": ratio_rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

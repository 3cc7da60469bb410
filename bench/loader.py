"""Loader throughput on an ImageNet-like fixture of REAL photos: uint8 batches of 128 px
RandomResizedCrop+flip from sz/160 (and 224 px from sz/320, and validation crops), ours against
the baselines people use, measured in the same run with the same workers and batch size:

  (1) torchvision ImageFolder + PIL on the full-size JPEG folder (everyone's starting point)
  (2) ImageFolder + PIL on PIL-resized sz/160 copies (imagenet18's way)
  (3) LMDB + PIL, per-sample txn.get + PIL decode + torchvision transforms (Efficient-PyTorch's way)
  (4) WebDataset + PIL over tar shards of the sz/160 JPEGs (skipped if webdataset is missing)
  (5) ours: TrainLoader over train-160 (LMDB and msgpack), built by `prep build-*`
  (6) the floor: libjpeg-turbo decode of the stored sz/160 JPEGs alone, one process
  (7) FFCV (default and contiguous output) and DALI's CPU pipeline on the same records, when
      bench/setup_peers.sh has made their venv (else one "skipped" line each); bench/loader_peers.py
      compares them with ours and the issue-10 prototype in interleaved rounds

    python bench/loader.py [--workers 2] [--batch-size 128] [--seconds 5] [--repeats 1] \\
        [--json-out r.json]

Each figure is the best of --repeats timed windows of >= --seconds (whole rounds of batches,
warm-up batches excluded) on one endless iterator per loader. img/s per worker core is img/s
divided by the workers; img/CPU-s divides by the CPU time the loader's processes (workers and
main) used in the window, which a busy shared machine disturbs much less. No model is attached,
so the main process waits for data all the time: ms/batch is the data wait per batch.
Inputs are cached under <fixture>/loader-bench/ (first run: ~1 min more).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))

import fixture  # noqa: E402  (bench/fixture.py)
import loader_baselines as base  # noqa: E402  (bench/loader_baselines.py)
import peer_servers  # noqa: E402  (bench/peer_servers.py: FFCV, DALI in their own venv)

from train.bench.loader import machine_description  # noqa: E402
from train.data import TrainLoader, ValLoader  # noqa: E402
from train.data.crops import TrainCrop  # noqa: E402

GROUPS = ("train128", "train224", "val224")
GROUP_TITLES = {
    "train128": "train: 128 px RandomResizedCrop+flip from sz/160",
    "train224": "train: 224 px RandomResizedCrop+flip from sz/320",
    "val224": "val: 224 px center crop (Resize 256 + CenterCrop 224; ours from the 320 records)",
}


class EndlessTrainLoader(TrainLoader):
    """Epochs back to back in one DataLoader iteration, like the baselines' endless samplers."""

    def plans(self):
        for epoch in itertools.count():
            self.set_epoch(epoch)
            yield from super().plans()


class EndlessValLoader(ValLoader):
    def plans(self):
        while True:
            yield from super().plans()


@contextlib.contextmanager
def running(loader):
    """(batch iterator, worker pids) of a DataLoader or one of ours; workers stopped on exit."""
    if isinstance(loader, (TrainLoader, ValLoader)):
        try:
            yield iter(loader), loader.worker_pids
        finally:
            loader.close()
        return
    # A baseline DataLoader (not persistent): its workers are this process's new children,
    # and they stop when its iterator is freed (torch's finalizer), here on exit.
    before = {child.pid for child in psutil.Process().children()}
    stream = (batch for batch in iter(loader))  # its iterator is held only here: close() frees it
    try:
        yield (
            stream,
            lambda: [child.pid for child in psutil.Process().children() if child.pid not in before],
        )
    finally:
        stream.close()


def _cpu_seconds(processes) -> float:
    times = [process.cpu_times() for process in processes]
    return sum(t.user + t.system for t in times)


def measure(loader, args, crop_size: int | None) -> dict:
    """Best of args.repeats windows of >= args.seconds, in whole rounds of one batch per worker."""
    step = max(1, args.workers)
    with running(loader) as (batches, pids):
        for warm in range(max(step, args.warmup_batches)):
            images, labels = next(batches)
            if warm == 0:
                expected = (args.batch_size, 3, crop_size, crop_size) if crop_size else None
                if (
                    images.dtype.is_floating_point
                    or images.ndim != 4
                    or images.shape[1] != 3
                    or (expected and tuple(images.shape) != expected)
                    or len(labels) != len(images)
                ):
                    raise SystemExit(
                        f"unexpected batch {tuple(images.shape)} {images.dtype}, wanted {expected}"
                    )
        worker_pids = pids()
        # threads: this process
        expected_pids = 0 if getattr(loader, "executor", None) == "threads" else args.workers
        if len(worker_pids) != expected_pids:
            raise SystemExit(f"found {len(worker_pids)} worker processes, expected {expected_pids}")
        processes = [psutil.Process(pid) for pid in worker_pids] + [psutil.Process()]
        windows = []
        for _ in range(args.repeats):
            cpu_started, started, images, count = _cpu_seconds(processes), time.perf_counter(), 0, 0
            while True:
                images += len(next(batches)[0])
                count += 1
                if (
                    count % step == 0
                    and count >= 2 * step
                    and time.perf_counter() - started >= args.seconds
                ):
                    break
            windows.append(
                {
                    "images": images,
                    "seconds": time.perf_counter() - started,
                    "batches": count,
                    "cpu_seconds": _cpu_seconds(processes) - cpu_started,
                    "workers": args.workers,
                }
            )
    return max(windows, key=lambda w: w["images"] / w["seconds"]) | {"windows": windows}


def summarize(raw: dict) -> dict:
    rate = raw["images"] / raw["seconds"]
    return raw | {
        "img_per_s": rate,
        "img_per_s_per_worker": rate / max(raw["workers"], 1),
        "img_per_cpu_s": raw["images"] / max(raw["cpu_seconds"], 1e-9),
        "ms_per_batch": 1000 * raw["seconds"] / raw["batches"] if raw["batches"] else None,
    }


def configs(args, fixture_dir: Path, cache: Path):
    """(group, key, label, thunk -> raw result | str why skipped), lazily, cheapest first."""
    folders = base.resized_folders(fixture_dir, cache, (160, 320), args.workers)
    shards = base.our_shards(fixture_dir, cache, (160, 320))
    full = fixture_dir / "folders" / "train"
    lmdb160, lmdb320 = shards["lmdb"] / "train-160", shards["lmdb"] / "train-320"
    w, b = args.workers, args.batch_size
    try:
        import webdataset  # noqa: F401

        urls = base.wds_tars(lmdb160, cache)
    except ImportError:
        urls = None
    train128, train224, val = (
        base.train_transform(128),
        base.train_transform(224),
        base.val_transform(224, 256),
    )

    def ours_train(store_dir, crop):
        return lambda: measure(
            EndlessTrainLoader(store_dir, b, TrainCrop(crop), workers=w), args, crop
        )

    def ours_val(rect):
        return lambda: measure(
            EndlessValLoader(lmdb320, b, 224, workers=w, rect=rect), args, None if rect else 224
        )

    def folder(root, transform, crop):
        return lambda: measure(base.imagefolder_loader(root, transform, b, w), args, crop)

    return [
        (
            "train128",
            "imagefolder_full",
            "(1) ImageFolder+PIL, full-size JPEGs",
            folder(full, train128, 128),
        ),
        (
            "train128",
            "imagefolder_160",
            "(2) ImageFolder+PIL, sz/160 copies",
            folder(folders[160], train128, 128),
        ),
        (
            "train128",
            "lmdb_pil",
            "(3) LMDB+PIL (Efficient-PyTorch), train-160",
            lambda: measure(base.lmdb_pil_loader(lmdb160, train128, b, w), args, 128),
        ),
        (
            "train128",
            "webdataset",
            "(4) WebDataset+PIL, sz/160 tars",
            (lambda: measure(base.webdataset_loader(urls, train128, b, w), args, 128))
            if urls
            else (lambda: "skipped: webdataset is not installed"),
        ),
        ("train128", "ours_lmdb", "(5) ours TrainLoader, LMDB train-160", ours_train(lmdb160, 128)),
        (
            "train128",
            "ours_msgpack",
            "(5) ours TrainLoader, msgpack train-160",
            ours_train(shards["msgpack"] / "train-160", 128),
        ),
        (
            "train128",
            "floor",
            "(6) floor: turbojpeg decode of train-160, 1 proc",
            lambda: base.decode_floor(lmdb160, args.seconds),
        ),
        (
            "train224",
            "imagefolder_full",
            "(1) ImageFolder+PIL, full-size JPEGs",
            folder(full, train224, 224),
        ),
        (
            "train224",
            "imagefolder_320",
            "(2) ImageFolder+PIL, sz/320 copies",
            folder(folders[320], train224, 224),
        ),
        ("train224", "ours_lmdb", "(5) ours TrainLoader, LMDB train-320", ours_train(lmdb320, 224)),
        (
            "train224",
            "floor",
            "(6) floor: turbojpeg decode of train-320, 1 proc",
            lambda: base.decode_floor(lmdb320, args.seconds),
        ),
        (
            "val224",
            "imagefolder_full",
            "(1) ImageFolder+PIL, full-size JPEGs",
            folder(full, val, 224),
        ),
        (
            "val224",
            "imagefolder_320",
            "(2) ImageFolder+PIL, sz/320 copies",
            folder(folders[320], val, 224),
        ),
        ("val224", "ours_center", "(5) ours ValLoader rect=False, LMDB train-320", ours_val(False)),
        ("val224", "ours_rect", "(5) ours ValLoader rect=True, LMDB train-320", ours_val(True)),
    ]


RATIOS = [  # (group, label, numerator, denominator or None for a per-core figure, target)
    (
        "train128",
        "ours LMDB vs (1) ImageFolder full-size",
        "ours_lmdb",
        "imagefolder_full",
        ">= 4x",
    ),
    ("train128", "ours LMDB vs (2) ImageFolder sz/160", "ours_lmdb", "imagefolder_160", ">= 1.5x"),
    ("train128", "ours LMDB vs (3) LMDB+PIL", "ours_lmdb", "lmdb_pil", ""),
    ("train128", "ours LMDB vs (4) WebDataset", "ours_lmdb", "webdataset", ""),
    ("train128", "ours msgpack vs ours LMDB", "ours_msgpack", "ours_lmdb", ""),
    ("train128", "ours LMDB per core vs (6) decode floor", "ours_lmdb", "floor", ""),
    ("train128", "ours LMDB img/s per worker core", "ours_lmdb", None, ">= 2000"),
    ("train128", "ours LMDB vs (7) FFCV default", "ours_lmdb", "ffcv", ""),
    ("train128", "ours LMDB vs (7) FFCV contiguous", "ours_lmdb", "ffcv-contiguous", ""),
    ("train128", "ours LMDB vs (7) DALI CPU", "ours_lmdb", "dali", ""),
    ("train224", "ours LMDB vs (1) ImageFolder full-size", "ours_lmdb", "imagefolder_full", ""),
    ("train224", "ours LMDB vs (7) FFCV default", "ours_lmdb", "ffcv", ""),
    ("train224", "ours LMDB vs (7) FFCV contiguous", "ours_lmdb", "ffcv-contiguous", ""),
    ("train224", "ours LMDB vs (7) DALI CPU", "ours_lmdb", "dali", ""),
    ("train224", "ours LMDB vs (2) ImageFolder sz/320", "ours_lmdb", "imagefolder_320", ""),
    ("train224", "ours LMDB per core vs (6) decode floor", "ours_lmdb", "floor", ""),
    ("val224", "ours center vs (1) ImageFolder full-size", "ours_center", "imagefolder_full", ""),
    ("val224", "ours center vs (2) ImageFolder sz/320", "ours_center", "imagefolder_320", ""),
    ("val224", "ours rect vs ours center", "ours_rect", "ours_center", ""),
]


def ratios(results: dict) -> list[dict]:
    """Per worker core (wall) and per CPU-second; '-' where a side was skipped."""
    out = []
    for group, label, top, bottom, target in RATIOS:
        a, b = (
            results.get(group, {}).get(top),
            results.get(group, {}).get(bottom) if bottom else None,
        )
        if not isinstance(a, dict) or (bottom and not isinstance(b, dict)):
            continue
        if bottom is None:
            wall, cpu = a["img_per_s_per_worker"], a["img_per_cpu_s"]
        else:
            wall, cpu = (
                a["img_per_s_per_worker"] / b["img_per_s_per_worker"],
                a["img_per_cpu_s"] / b["img_per_cpu_s"],
            )
        out.append(
            {
                "group": group,
                "ratio": label,
                "per_core_wall": wall,
                "per_cpu_s": cpu,
                "target": target,
            }
        )
    return out


def load_or_build_fixture(fixture_dir: Path, num_images: int) -> dict:
    """As bench/prep.py: an existing fixture is used as it is."""
    saved = fixture_dir / "fixture.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    return fixture.build_fixture(fixture_dir, num_images, 20, 0, quiet=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="at least this long per timed window"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed windows per loader; the best is kept"
    )
    parser.add_argument("--warmup-batches", type=int, default=4)
    parser.add_argument(
        "--groups", default=",".join(GROUPS), help=f"comma-separated subset of {GROUPS}"
    )
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument(
        "--peers-python", type=Path, help="python of the peer venv (default bench/.peers-venv)"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    groups = [g for g in args.groups.split(",") if g]
    if set(groups) - set(GROUPS) or args.workers < 1 or args.repeats < 1:
        parser.error(f"--groups from {GROUPS}; --workers and --repeats >= 1")

    started = time.perf_counter()
    fixture_dir = args.cache / f"fixture-{args.num_images}"
    stats = load_or_build_fixture(fixture_dir, args.num_images)["stats"]
    cache = base.cache_dir_for(fixture_dir)
    peers = peer_servers.peer_baselines(
        args, base.our_shards(fixture_dir, cache, (160, 320))["lmdb"], cache
    )
    todo = sorted(
        (c for c in configs(args, fixture_dir, cache) + peers if c[0] in groups),
        key=lambda c: GROUPS.index(c[0]),
    )
    prepared = time.perf_counter() - started
    print(f"machine: {machine_description()}")
    print(
        f"fixture: {stats['count']} real-photo JPEGs, median {stats['median_width']:.0f}x"
        f"{stats['median_height']:.0f}, mean {stats['mean_kb']:.0f} KB ({fixture_dir}); inputs "
        f"ready in {prepared:.0f} s"
    )
    print(
        f"settings: {args.workers} workers, batch {args.batch_size}, best of {args.repeats} "
        "window(s) of "
        f">= {args.seconds:g} s, {max(args.workers, args.warmup_batches)} warm-up batches; "
        "no model, so ms/batch = data wait per batch"
    )

    results: dict[str, dict] = {}
    header = f"  {'loader':<48} {'img/s':>7} {'/wkr core':>9} {'img/CPU-s':>9} {'ms/batch':>8}"
    for group, key, label, thunk in todo:
        if group not in results:
            print(f"\n{GROUP_TITLES[group]}\n{header}")
            results[group] = {}
        raw = thunk()
        if isinstance(raw, str):
            results[group][key] = raw
            print(f"  {label:<48} {raw}")
            continue
        result = results[group][key] = summarize(raw) | {"label": label}
        ms = f"{result['ms_per_batch']:8.1f}" if result["ms_per_batch"] else f"{'-':>8}"
        print(
            f"  {label:<48} {result['img_per_s']:7.0f} {result['img_per_s_per_worker']:9.0f} "
            f"{result['img_per_cpu_s']:9.0f} {ms}",
            flush=True,
        )

    table = ratios(results)
    print("\nratios (per worker core, wall clock | per CPU-second):")
    for row in table:
        wall, cpu = (
            f"{row[k]:8.0f}" if row[k] >= 100 else f"{row[k]:8.2f}"
            for k in ("per_core_wall", "per_cpu_s")
        )
        print(
            f"  {row['group']:<9} {row['ratio']:<42} {wall} | {cpu}"
            f"  {('target ' + row['target']) if row['target'] else ''}"
        )
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "machine": machine_description(),
                    "fixture": stats,
                    "settings": vars(args)
                    | {
                        "cache": str(args.cache),
                        "json_out": str(args.json_out),
                        "peers_python": str(args.peers_python),
                    },
                    "results": results,
                    "ratios": table,
                    "seconds_total": total,
                    "seconds_inputs": prepared,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

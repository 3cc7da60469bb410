"""Conversion from each ImageNet mirror layout (HF parquet, HF tar.gz, timm WebDataset) against
the same images in the official train tar, and the build tree's peak memory on a large parquet
source against the same images as a tar.

    python bench/mirrors.py [--num-images 2000] [--rounds 3] [--workers 2] [--rss-images 20000]

Throughput: every layout holds the same images in the same order; each round builds each layout
once (the order rotated every round), same workers and prep_size; the table gives each layout's
median img/s over the rounds and its ratio to the official tar's median, and the CPU ms per
image of the whole build (main process + workers), which other load on a shared machine moves
far less than the wall-clock rate. Peak RSS: `prep
build-lmdb` as a subprocess, its whole process tree's anonymous RSS sampled every 20 ms
(bench/proctree.py), on --rss-images and a tenth of them, parquet and official tar.
Images: photo-sized (~500x375) JPEGs of smooth gradients plus sensor-like noise, a few hundred
distinct ones repeated under distinct names (the repeat does not matter to the readers), or with
--photos DIR, bench/fixture.py's real photos (ImageNet's size statistics) for the throughput runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo first: bench/prep.py is no package

from proctree import TreeSampler  # noqa: E402

from prep.build import BuildConfig, build  # noqa: E402
from prep.imagenet_classes import imagenet_wnids  # noqa: E402
from prep.sample.mirrors import WRITERS  # noqa: E402

PREP_SIZE = 160
DISTINCT = 200


def photo_like(index: int, rng: np.random.Generator) -> bytes:
    height, width = (375, 500) if index % 4 else (500, 375)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    pixels = np.stack(
        [
            128
            + 100 * np.sin(xx / rng.uniform(20, 90) + phase[c]) * np.cos(yy / rng.uniform(20, 90))
            for c in range(3)
        ],
        axis=-1,
    )
    pixels += rng.normal(0, 12, pixels.shape)
    out = __import__("io").BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def items(num_images: int, distinct: list[bytes]) -> list[tuple[str, str, bytes]]:
    """In official order: 10 classes spread over the 1000, sorted; images numbered within."""
    wnids = imagenet_wnids()[::100]
    per_class = -(-num_images // len(wnids))
    return [
        (wnid, f"{wnid}_{i}", distinct[(c * per_class + i) % len(distinct)])
        for c, wnid in enumerate(wnids)
        for i in range(per_class)
    ][:num_images]


def photo_items(fixture_dir: Path, num_images: int) -> list[tuple[str, str, bytes]]:
    """bench/fixture.py's real-photo fixture (built once, then reused), its 10 classes given
    real wnids spread over the 1000, in official order."""
    import fixture

    fixture.build_fixture(fixture_dir, num_images, 10, 0, quiet=True)
    wnids = imagenet_wnids()[::100]
    class_dirs = sorted((fixture_dir / "folders" / "train").iterdir())
    return [
        (wnid, f"{wnid}_{path.stem.rpartition('_')[2]}", path.read_bytes())
        for wnid, class_dir in zip(wnids, class_dirs)
        for path in sorted(class_dir.iterdir())
    ]


def write_layouts(root: Path, data: list) -> dict[str, Path]:
    dirs = {}
    for layout, write in WRITERS.items():
        dirs[layout] = root / layout
        write(dirs[layout], data)
    return dirs


def cpu_seconds() -> float:
    """This process's and its reaped children's (the build's workers, joined at its end) CPU
    seconds: what a build costs, which other load on a shared machine barely moves."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def throughput(dirs: dict[str, Path], rounds: int, workers: int, out_root: Path) -> dict:
    rates: dict[str, list[float]] = {layout: [] for layout in dirs}
    cpu_ms: dict[str, list[float]] = {layout: [] for layout in dirs}
    layouts = list(dirs)
    for round_index in range(rounds):
        order = layouts[round_index % len(layouts) :] + layouts[: round_index % len(layouts)]
        for layout in order:
            out = out_root / f"{layout}-{round_index}"
            cpu_before = cpu_seconds()
            summary = build(
                BuildConfig(
                    dirs[layout], out, "train", (PREP_SIZE,), "lmdb", workers=workers, quiet=True
                )
            )
            cpu_ms[layout].append(1000 * (cpu_seconds() - cpu_before) / summary.consumed)
            rates[layout].append(summary.images_per_second)
            subprocess.run(["rm", "-rf", str(out)], check=True)
            print(
                f"  round {round_index} {layout:15s} {summary.images_per_second:7.1f} img/s "
                f"{cpu_ms[layout][-1]:6.2f} CPU ms/img",
                flush=True,
            )
    base, base_cpu = statistics.median(rates["train-tar"]), statistics.median(cpu_ms["train-tar"])
    return {
        layout: {
            "img_s": [round(r, 1) for r in values],
            "median": round(statistics.median(values), 1),
            "best": round(max(values), 1),
            "vs_train_tar": round(statistics.median(values) / base, 3),
            "cpu_ms_per_img": [round(c, 2) for c in cpu_ms[layout]],
            "cpu_vs_train_tar": round(statistics.median(cpu_ms[layout]) / base_cpu, 3),
        }
        for layout, values in rates.items()
    }


def peak_rss_mib(src: Path, out: Path, workers: int) -> tuple[float, float]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prep.cli",
            "build-lmdb",
            "--src",
            str(src),
            "--out",
            str(out),
            "--size",
            str(PREP_SIZE),
            "--workers",
            str(workers),
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    started = time.perf_counter()
    sampler = TreeSampler(process.pid)
    stdout, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"build of {src} failed:\n{stderr}")
    return sampler.stop().peak_rss_mib, time.perf_counter() - started


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rss-images", type=int, default=20000, help="0: no memory runs")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--photos",
        type=Path,
        help="fixture dir: real photos (bench/fixture.py) for the throughput "
        "runs instead of synthetic images",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    distinct = [photo_like(i, rng) for i in range(DISTINCT)]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine_before": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "prep_size": PREP_SIZE,
        "mean_image_kib": round(sum(map(len, distinct)) / len(distinct) / 1024, 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = (
            photo_items(args.photos, args.num_images)
            if args.photos
            else items(args.num_images, distinct)
        )
        result["images"] = {
            "photos": str(args.photos) if args.photos else None,
            "mean_kib": round(sum(len(d) for _, _, d in data) / len(data) / 1024, 1),
        }
        dirs = write_layouts(root / "src", data)
        print(
            f"throughput: {args.num_images} images, {args.workers} workers, {args.rounds} "
            "interleaved rounds"
        )
        result["throughput"] = throughput(dirs, args.rounds, args.workers, root / "out")
        subprocess.run(["rm", "-rf", str(root / "src")], check=True)
        result["peak_rss_mib"] = {}
        for count in (args.rss_images // 10, args.rss_images) if args.rss_images else ():
            data = items(count, distinct)
            for layout in ("hf-parquet", "train-tar"):
                src = root / f"rss-{layout}-{count}"
                WRITERS[layout](src, data)
                peak, seconds = peak_rss_mib(src, root / f"rss-out-{layout}-{count}", args.workers)
                result["peak_rss_mib"][f"{layout} {count}"] = {
                    "peak_rss_mib": round(peak, 1),
                    "seconds": round(seconds, 1),
                }
                print(
                    f"  peak RSS {layout:12s} {count:6d} images: {peak:7.1f} MiB ({seconds:.1f} s)",
                    flush=True,
                )
                subprocess.run(
                    ["rm", "-rf", str(src), str(root / f"rss-out-{layout}-{count}")], check=True
                )
    result["machine_after"] = machine()
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

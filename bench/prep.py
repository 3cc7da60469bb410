"""Prep throughput on an ImageNet-like fixture of REAL photos, against baselines measured in the
same run: a naive PIL script (full decode, resize, save: how fast.ai made its sz/160 copies) and
the codec floor (our decode-at-scale + resize + encode calls alone, in memory, no I/O or IPC).

    python bench/prep.py [--num-images 2000] [--repeats 3] [--json-out results.json]

Prints img/s per configuration, the ratios the prep issues target, peak RSS of the build's
process tree at two dataset sizes, and the machine. Each timing is the best of --repeats, the
configurations interleaved within each repeat. One-worker builds also run on the small fixture,
so "steady" rates leave the build's fixed costs out (2,000 minus 500 images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import fixture  # noqa: E402  (bench/fixture.py, a script module)
from proctree import TreeSampler, children_cpu_seconds  # noqa: E402

from formats.jpeg import codec_report  # noqa: E402
from prep.resize import prepare_image  # noqa: E402

QUALITY = 90


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    codecs = codec_report()
    return (
        f"{model}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
        f"{codecs['pil']}, {codecs['turbojpeg']}"
    )


def load_or_build_fixture(fixture_dir: Path, num_images: int) -> dict:
    """An existing fixture is used as it is: rebuilding it in an environment without
    scikit-image would silently change the images and make runs incomparable."""
    saved = fixture_dir / "fixture.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    return fixture.build_fixture(fixture_dir, num_images, 20, 0, quiet=True)


def naive_baseline(files: list[Path], out_dir: Path) -> float:
    """One process: open, full decode, RGB, bilinear resize of the shorter side to 160, save."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path in files:
        image = Image.open(path).convert("RGB")
        ratio = 160 / min(image.size)
        image = image.resize(
            (max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
            Image.BILINEAR,
        )
        image.save(out_dir / path.name, "JPEG", quality=QUALITY)
    return time.perf_counter() - started


def naive_in(python: str, file_list: Path, out_dir: Path) -> float:
    """The naive baseline run by another interpreter (e.g. a venv with plain Pillow, what a user
    has, while this one runs pillow-simd); it reports its own seconds."""
    result = subprocess.run(
        [python, __file__, "--naive-only", str(file_list), str(out_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def codec_floor(datas: list[bytes], prep_sizes: tuple[int, ...]) -> tuple[float, float]:
    """(wall, CPU) seconds of our per-image calls alone, one process, in memory."""
    started, cpu_started = time.perf_counter(), time.process_time()
    for data in datas:
        prepare_image(data, prep_sizes, QUALITY)
    return time.perf_counter() - started, time.process_time() - cpu_started


def run_tool(args: list[str]) -> tuple[float, float, float, str]:
    """(seconds the tool reports for its work, CPU seconds of its whole process tree, peak tree
    RSS in MiB, stdout). The CPU time comes from the kernel's accounting of waited-for children
    (prep waits for its workers), so other load on the machine barely moves it."""
    cpu_before = children_cpu_seconds()
    process = subprocess.Popen(
        [sys.executable, "-m", "prep.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    sampler = TreeSampler(process.pid)
    stdout, stderr = process.communicate()
    peak = sampler.stop().peak_rss_mib
    if process.returncode:
        raise SystemExit(f"prep {' '.join(args)} failed:\n{stderr}")
    match = re.search(r"in ([\d.]+) s", stdout)
    return float(match.group(1)), children_cpu_seconds() - cpu_before, peak, stdout


def steady_rates(rates: dict[str, float], count: int, small_count: int) -> dict[str, float]:
    """Adds "<build> steady": img/s over the images the big fixture has beyond the small one,
    (count - small_count) / (t_big - t_small), i.e. without the build's fixed costs (pool
    start, listing, finalize), which a 2,000-image build still feels and ImageNet does not."""
    steady = {}
    for name, rate in rates.items():
        small = rates.get(f"{name}, small fixture")
        if small:
            steady[f"{name} steady"] = (count - small_count) / max(
                count / rate - small_count / small, 1e-9
            )
    return {**rates, **steady}


def prep_build(
    src: Path, out: Path, prep_sizes: tuple[int, ...], workers: int
) -> tuple[tuple[float, float], float]:
    """((wall, CPU) seconds, peak tree RSS in MiB) of one build."""
    args = [
        "build-lmdb",
        "--src",
        str(src),
        "--out",
        str(out),
        "--split",
        "train",
        "--workers",
        str(workers),
        "--overwrite",
        "-q",
    ] + [a for s in prep_sizes for a in ("--size", str(s))]
    seconds, cpu, peak, _ = run_tool(args)
    return (seconds, cpu), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument(
        "--small-images", type=int, default=500, help="second fixture size for the RSS growth check"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--baseline-python",
        help="also time the naive baseline under this interpreter (plain Pillow)",
    )
    parser.add_argument(
        "--naive-only", nargs=2, type=Path, metavar=("FILE_LIST", "OUT_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.naive_only:  # child mode for --baseline-python
        file_list, out_dir = args.naive_only
        print(naive_baseline([Path(p) for p in file_list.read_text().split("\n") if p], out_dir))
        return 0

    fixture_dir = args.cache / f"fixture-{args.num_images}"
    stats = load_or_build_fixture(fixture_dir, args.num_images)["stats"]
    small_dir = args.cache / f"fixture-{args.small_images}"
    load_or_build_fixture(small_dir, args.small_images)
    files = sorted((fixture_dir / "folders" / "train").glob("*/*.JPEG"))
    datas = [path.read_bytes() for path in files]
    src = fixture_dir / "archives"
    count = len(files)
    print(f"machine: {machine()}")
    if args.baseline_python:
        variant = subprocess.run(
            [
                args.baseline_python,
                "-c",
                "import sys; sys.path.insert(0, %r); "
                "from formats.jpeg import pil_variant; print(pil_variant())" % str(HERE.parent),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"baseline python: {args.baseline_python} ({variant})")
    print(
        f"fixture: {count} real-photo JPEGs, median "
        f"{stats['median_width']:.0f}x{stats['median_height']:.0f}, "
        f"mean {stats['mean_kb']:.0f} KB ({fixture_dir})"
    )

    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        tmp = Path(tmp)
        builds = {
            "prep 160 w1": ((160,), 1),
            "prep 320 w1": ((320,), 1),
            "prep 160+320 w1": ((160, 320), 1),
            "prep 160 w2": ((160,), 2),
        }
        seconds: dict[str, list[float]] = {}
        cpu_seconds: dict[str, list[float]] = {}
        peaks: dict[str, float] = {}

        def record(name: str, value) -> None:
            """value: wall seconds, or (wall, CPU) seconds."""
            wall, cpu = value if isinstance(value, tuple) else (value, None)
            seconds.setdefault(name, []).append(wall)
            if cpu is not None:
                cpu_seconds.setdefault(name, []).append(cpu)

        # This VM's speed drifts by ~20% within a minute, so every repeat measures every
        # configuration in turn (interleaved), and each keeps its best: ratios then compare
        # measurements taken close together, not early ones with late ones.
        file_list = tmp / "files.txt"
        file_list.write_text("\n".join(map(str, files)))
        for _ in range(args.repeats):
            record("naive 160", naive_baseline(files, tmp / "naive"))
            if args.baseline_python:
                record(
                    "naive 160, baseline python",
                    naive_in(args.baseline_python, file_list, tmp / "naive2"),
                )
            record("floor 160", codec_floor(datas, (160,)))
            record("floor 320", codec_floor(datas, (320,)))
            record("floor 160+320", codec_floor(datas, (160, 320)))
            for name, (sizes, workers) in builds.items():
                elapsed, peak = prep_build(src, tmp / "out", sizes, workers)
                record(name, elapsed)
                peaks[name] = max(peaks.get(name, 0.0), peak)
                # the same build of the small fixture: start-up and finalize cancel out
                if workers == 1:
                    record(
                        f"{name}, small fixture",
                        prep_build(small_dir / "archives", tmp / "small", sizes, 1)[0],
                    )
            prep_build(src, tmp / "out", (160,), 1)  # train-160 alone, for verify
            for workers in (1, 2):
                record(
                    f"verify 160 w{workers}",
                    run_tool(
                        ["verify", str(tmp / "out" / "train-160"), "--workers", str(workers), "-q"]
                    )[0],
                )
        _, peaks["prep 160 w2, small fixture"] = prep_build(
            small_dir / "archives", tmp / "small", (160,), 2
        )
    small_count = len(list((small_dir / "folders" / "train").glob("*/*.JPEG")))

    def rates_of(measured: dict[str, list[float]], i: int) -> dict[str, float]:
        return steady_rates(
            {
                name: (small_count if name.endswith(", small fixture") else count) / values[i]
                for name, values in measured.items()
            },
            count,
            small_count,
        )

    runs = [rates_of(seconds, i) for i in range(args.repeats)]
    cpu_runs = [rates_of(cpu_seconds, i) for i in range(args.repeats)]  # img per CPU-second
    rate = {name: max(run[name] for run in runs) for name in runs[0]}

    def ratios_of(r: dict, c: dict) -> dict:
        baseline = (
            {
                "sz/160 one core vs naive, baseline python": r["prep 160 w1"]
                / r["naive 160, baseline python"]
            }
            if args.baseline_python
            else {}
        )
        return {
            **baseline,
            "sz/160 one core vs naive PIL": r["prep 160 w1"] / r["naive 160"],
            "sz/160 one core vs codec floor": r["prep 160 w1"] / r["floor 160"],
            "sz/160 one core vs codec floor, steady": r["prep 160 w1 steady"] / r["floor 160"],
            "160+320 time vs 160 alone (one core)": r["prep 160 w1"] / r["prep 160+320 w1"],
            "160+320 time vs 320 alone (one core)": r["prep 320 w1"] / r["prep 160+320 w1"],
            "160+320 time vs 320 alone, steady": r["prep 320 w1 steady"]
            / r["prep 160+320 w1 steady"],
            "160+320 one core vs its codec floor, steady": r["prep 160+320 w1 steady"]
            / r["floor 160+320"],
            "sz/320 one core vs codec floor, steady": r["prep 320 w1 steady"] / r["floor 320"],
            "codec floor 160+320 time vs 160": r["floor 160"] / r["floor 160+320"],
            "codec floor 160+320 time vs 320": r["floor 320"] / r["floor 160+320"],
            "2 workers vs 1 worker": r["prep 160 w2"] / r["prep 160 w1"],
            "verify per core (records/s)": r["verify 160 w1"],
            # per CPU-second of the whole build tree (main process included), steady state:
            # what other load on this shared VM moves least
            "CPU: sz/160 build vs codec floor, steady": c["prep 160 w1 steady"] / c["floor 160"],
            "CPU: 160+320 time vs 320 alone, steady": c["prep 320 w1 steady"]
            / c["prep 160+320 w1 steady"],
            "CPU: 160+320 build vs its codec floor, steady": c["prep 160+320 w1 steady"]
            / c["floor 160+320"],
            "CPU: codec floor 160+320 time vs 320": c["floor 320"] / c["floor 160+320"],
        }

    # Ratios are taken within each repeat (measurements minutes apart are not comparable
    # here), then summarised by their median and range.
    per_run = [ratios_of(run, cpu_run) for run, cpu_run in zip(runs, cpu_runs)]
    ratios = {name: statistics.median(r[name] for r in per_run) for name in per_run[0]}
    print("\nthroughput (img/s): best, and the range over %d interleaved repeats" % args.repeats)
    for name, value in rate.items():
        values = [run[name] for run in runs]
        cpu = [run[name] for run in cpu_runs if name in run]
        per_cpu = f"   {statistics.median(cpu):8.0f} per CPU-s" if cpu else ""
        print(f"  {name:<28} {value:8.0f}   ({min(values):.0f}-{max(values):.0f}){per_cpu}")
    print(
        "\nratios, median (range) of per-repeat ratios; targets: >= 2x naive, >= 0.9 of floor, "
        "160+320 <= 1.15x 320 alone, >= 1.8x scaling, >= 2000/s verify"
    )
    for name, value in ratios.items():
        values = [r[name] for r in per_run]
        print(f"  {name:<46} {value:8.2f}   ({min(values):.2f}-{max(values):.2f})")
    print("\npeak anonymous RSS of the build's process tree (MiB; file-backed pages excluded):")
    for name, value in peaks.items():
        print(f"  {name:<28} {value:8.0f}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "fixture": stats,
                    "img_per_s_best": rate,
                    "img_per_s_runs": runs,
                    "img_per_cpu_s_runs": cpu_runs,
                    "ratios_median": ratios,
                    "ratios_runs": per_run,
                    "peak_rss_mib": peaks,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

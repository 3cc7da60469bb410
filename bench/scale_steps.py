"""The steps of bench/scale.py: each runs the public commands or API on the rehearsal archive
and returns what it measured (plain JSON-able dicts)."""

from __future__ import annotations

import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from proctree import TreeSampler

REPO = Path(__file__).resolve().parents[1]
PREP_SIZE = 160
SAMPLE_SECONDS = 0.5
PROFILE_PARTS = 20  # profile one part of this many: the main process's costs, per member
TRAIN_BATCH, VAL_BATCH, CROP = 256, 250, 128


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{model}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def _consumed(partial_dir: Path) -> int | None:
    try:
        return json.loads((partial_dir / "progress.json").read_text())["consumed"]
    except (OSError, ValueError, KeyError):
        return None


def _progress_probe(partial_dir: Path):
    return lambda: _consumed(partial_dir)


def _parts_probe(out: Path, split: str):
    """Members consumed by all the parts of a build: the running ones' progress plus the
    finished ones' manifests (a finished part's partial directory is gone)."""

    def probe():
        running = [_consumed(p) for p in out.glob(f".{split}-{PREP_SIZE}.part-*.partial")]
        finished = 0
        for manifest_path in out.glob(f"{split}-{PREP_SIZE}.part-*/manifest.json"):
            try:
                manifest = json.loads(manifest_path.read_text())
                finished += manifest["count"] + len(manifest["rejects"])
            except (OSError, ValueError, KeyError):
                pass
        known = [c for c in running if c is not None]
        return sum(known) + finished if known or finished else None

    return probe


def run_watched(command: list[str], probe=None, cwd: Path = REPO) -> dict:
    """Run a command; its wall time, exit, output, and the tree's peaks and samples."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler = TreeSampler(process.pid, SAMPLE_SECONDS, probe, keep_samples=True)
    stdout, stderr = process.communicate()
    sampler.stop()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    return {
        "wall_s": time.monotonic() - started,
        "stdout": stdout,
        "peak_rss_mib": sampler.peak_rss_mib,
        "peak_fds": sampler.peak_fds,
        "peak_processes": sampler.peak_processes,
        "samples": sampler.samples,
    }


def throughput_profile(samples: list[dict], total: int) -> dict:
    """Per tenth of the members (from the build's committed progress): img/s, the main
    process's and the whole tree's CPU ms per image, the main process's RSS and the machine's
    available memory; and how long the build ran before the first and after the last member."""
    points = [s for s in samples if s["probe"] is not None]
    if len(points) < 2 or total <= 0:
        return {}
    first = points[0]
    # the first sample at the most members: a probe may fall back at the end (the parts of a
    # build are removed one by one once merged), so the last sample is not always the most
    last = next(p for p in points if p["probe"] >= max(q["probe"] for q in points))
    if last["probe"] - first["probe"] < 10 or last["t"] <= first["t"]:
        return {}  # too short a build (tiny mode) to see its rate change
    span = [p for p in points if p["t"] <= last["t"]]
    marks = [first["probe"] + (last["probe"] - first["probe"]) * k / 10 for k in range(11)]
    # the sample at or just after each mark: progress moves in commits, so this is exact enough
    at = [next(p for p in span if p["probe"] >= m) for m in marks]
    tenths = []
    for a, b in zip(at, at[1:]):
        images = max(b["probe"] - a["probe"], 1)
        seconds = max(b["t"] - a["t"], 1e-9)
        tenths.append(
            {
                "img_per_s": images / seconds,
                "main_cpu_ms": 1e3 * (b["main_cpu_s"] - a["main_cpu_s"]) / images,
                "main_sys_ms": 1e3 * (b["main_sys_s"] - a["main_sys_s"]) / images,
                "tree_cpu_ms": 1e3 * (b["tree_cpu_s"] - a["tree_cpu_s"]) / images,
                "tree_cpu_share": (b["tree_cpu_s"] - a["tree_cpu_s"]) / seconds,
                # cores busy with anything else (other users of the machine), waiting on
                # the disk, or taken by the hypervisor: what the tree could not have
                **{
                    f"{key}_share": (b[f"machine_{key}_s"] - a[f"machine_{key}_s"]) / seconds
                    for key in ("iowait", "steal")
                    if f"machine_{key}_s" in a
                },
                **(
                    {
                        "others_cpu_share": (
                            b["machine_busy_s"]
                            - a["machine_busy_s"]
                            - (b["tree_cpu_s"] - a["tree_cpu_s"])
                        )
                        / seconds
                    }
                    if "machine_busy_s" in a
                    else {}
                ),
                "main_rss_mib": b["main_rss_mib"],
                "available_mib": b["available_mib"],
            }
        )
    rates = [t["img_per_s"] for t in tenths]
    return {
        "tenths": tenths,
        "img_per_s_by_tenth": rates,
        "last_vs_first_tenth": rates[-1] / rates[0] if rates[0] else None,
        "main_cpu_ms_per_image": 1e3
        * (last["main_cpu_s"] - first["main_cpu_s"])
        / (last["probe"] - first["probe"]),
        "streaming_s": last["t"] - first["t"],
        "started_streaming_at_s": first["t"],
        "after_last_member_s": samples[-1]["t"] - last["t"],
    }


def _du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Rehearsal:
    def __init__(self, data_dir: Path, quality: int, workers: int | None):
        self.data_dir = Path(data_dir)
        self.src_dir = self.data_dir / "src"
        self.shards_dir = self.data_dir / "shards"
        self.quality, self.workers = quality, workers

    def _prep(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "prep.cli", *args]

    def _build_args(self, split: str, out: Path) -> list[str]:
        args = [
            "build-msgpack",
            "--src",
            str(self.src_dir),
            "--out",
            str(out),
            "--split",
            split,
            "--size",
            str(PREP_SIZE),
            "--quality",
            str(self.quality),
            "--overwrite",
            "-q",
        ]
        return args + (["--workers", str(self.workers)] if self.workers is not None else [])

    def run_prep(self) -> dict:
        """train and val at 160 px, then val at 160 + 320 px in one pass (elsewhere), for the main
        process's cost per image with two outputs."""
        results = {}
        two_sizes = self.data_dir / "two-sizes"
        for name, split, out, extra in (
            ("train", "train", self.shards_dir, []),
            ("val", "val", self.shards_dir, []),
            ("val 160+320", "val", two_sizes, ["--size", "320"]),
        ):
            partial = out / f".{split}-{PREP_SIZE}.partial"
            # --overwrite discards it anyway; removed first so the probe cannot read an
            # interrupted earlier run's progress before the build has started
            shutil.rmtree(partial, ignore_errors=True)
            run = run_watched(
                self._prep(*self._build_args(split, out), *extra), _progress_probe(partial)
            )
            dataset = out / f"{split}-{PREP_SIZE}"
            manifest = json.loads((dataset / "manifest.json").read_text())
            total = manifest["count"] + len(manifest["rejects"])
            summary = re.search(
                r"([\d,]+) images in ([\d.]+) s = ([\d,]+) img/s with (\d+) workers", run["stdout"]
            )
            results[name] = {
                "members": total,
                "records": manifest["count"],
                "rejects": len(manifest["rejects"]),
                "conversions": len(manifest["conversions"]),
                "stored_as_is": manifest["build"]["num_stored_as_is"],
                "tool_seconds": float(summary.group(2)),
                "tool_img_per_s": int(summary.group(3).replace(",", "")),
                "workers": int(summary.group(4)),
                "dataset_bytes": _du_bytes(dataset),
                **{k: run[k] for k in ("wall_s", "peak_rss_mib", "peak_fds", "peak_processes")},
                **throughput_profile(run["samples"], total),
                "rss_mib_by_sample": [round(s["rss_mib"], 1) for s in run["samples"]][
                    :: max(1, len(run["samples"]) // 40)
                ],
            }
        shutil.rmtree(two_sizes)
        results["source_bytes"] = _du_bytes(self.src_dir)
        return results

    def run_profile(self) -> dict:
        out, profile_path = self.data_dir / "profile-out", self.data_dir / "prep-main.prof"
        command = [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(profile_path),
            "-m",
            "prep.cli",
            *self._build_args("train", out),
            "--num-parts",
            str(PROFILE_PARTS),
            "--part-index",
            "0",
        ]
        run = run_watched(command)
        stats = pstats.Stats(str(profile_path))
        total_s = stats.total_tt
        rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:25]
        members = json.loads(
            next(out.glob("train-*.part-*")).joinpath("manifest.json").read_text()
        )["build"]["part"]
        shutil.rmtree(out)
        return {
            "members": members["num_members"],
            "part_bytes": members["bytes"][1] - members["bytes"][0],
            "source_bytes": members["source_bytes"],
            "wall_s": run["wall_s"],
            "main_total_s": total_s,
            "top_tottime": [
                {
                    "function": f"{Path(f).name}:{line}:{name}",
                    "calls": calls,
                    "tottime_s": tottime,
                    "us_per_member": 1e6 * tottime / members["num_members"],
                }
                for (f, line, name), (_, calls, tottime, _, _) in rows
            ],
        }

    def run_verify(self) -> dict:
        results = {}
        for split in ("train", "val"):
            dataset = self.shards_dir / f"{split}-{PREP_SIZE}"
            run = run_watched(
                self._prep(
                    "verify",
                    str(dataset),
                    "--source",
                    str(self.src_dir),
                    "-q",
                    *(["--workers", str(self.workers)] if self.workers is not None else []),
                )
            )
            checked = re.search(r"([\d,]+) records checked in ([\d.]+) s", run["stdout"])
            results[split] = {
                "ok": run["stdout"].rstrip().endswith("OK"),
                "records": int(checked.group(1).replace(",", "")),
                "tool_seconds": float(checked.group(2)),
                **{k: run[k] for k in ("wall_s", "peak_rss_mib", "peak_fds")},
            }
        return results

    def run_train(self) -> dict:
        from scale_train import measure_train_side  # imports torch: only this step pays for it

        return measure_train_side(
            self.shards_dir / f"train-{PREP_SIZE}",
            self.shards_dir / f"val-{PREP_SIZE}",
            self.data_dir,
        )

    def run_parts(self) -> dict:
        """2 torchrun ranks build a part each and rank 0 merges; compared with the single build."""
        single = self.shards_dir / f"train-{PREP_SIZE}"
        kept = self.data_dir / "single-build-files"
        if (single / "manifest.json").is_file():  # keep what is compared; drop the store (disk)
            shutil.rmtree(kept, ignore_errors=True)
            kept.mkdir()
            for name in ("manifest.json", "records.npy", "names.txt", "index.npy"):
                shutil.copy2(single / name, kept / name)
            single_seconds = json.loads((self.data_dir / "results.json").read_text())["prep"][
                "train"
            ]["wall_s"]
            (kept / "wall_s").write_text(str(single_seconds))
            shutil.rmtree(single)
        out = self.data_dir / "parts"
        shutil.rmtree(out, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "prep.cli",
            *self._build_args("train", out),
        ]
        run = run_watched(command, _parts_probe(out, "train"))
        merged = out / f"train-{PREP_SIZE}"
        identical = {
            name: (merged / name).read_bytes() == (kept / name).read_bytes()
            for name in ("manifest.json", "records.npy", "names.txt", "index.npy")
        }
        merge_s = float(re.search(r"merged from 2 parts in ([\d.]+) s", run["stdout"]).group(1))
        ranks = [
            float(s) for s in re.findall(r"\[rank \d\] [\d,]+ images in ([\d.]+) s", run["stdout"])
        ]
        merged_manifest = json.loads((merged / "manifest.json").read_text())
        members = merged_manifest["count"] + len(merged_manifest["rejects"])
        verify = run_watched(self._prep("verify", str(merged), "-q"))
        os.replace(merged, single)  # equal to the single build: later steps may use it as that
        return {
            "wall_s": run["wall_s"],
            "merge_s": merge_s,
            "rank_build_s": ranks,
            "single_build_wall_s": float((kept / "wall_s").read_text()),
            "identical_files": identical,
            "verify_ok": verify["stdout"].rstrip().endswith("OK"),
            "verify_wall_s": verify["wall_s"],
            "peak_rss_mib": run["peak_rss_mib"],
            "peak_fds": run["peak_fds"],
            **throughput_profile(run["samples"], members),
        }


def median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)

"""Issue 12, call 1 on a lent GPU: run every CUDA path once, then a first ResNet-50 table.

One script, one device call (~6 min on an H200), everything under --out, a short table last:

  1. inputs: bench/fixture.py's real-photo fixture, a val split of hard links into it, LMDB shards
     train/val at 160 and 320 (`prep build-lmdb`)
  2. the CUDA-marked tests (`pytest -m gpu` over the files that have them), with a timeout
  3. `train run` end to end, 2 short epochs (128 px from train-160, then 224 from train-320, so the
     loaders rebuild once): --decode cpu, --decode gpu, --precision fp16, --compile (1 epoch),
     bf16 + channels_last unless a row says otherwise
  4. SIGKILL + `--resume auto`: a deterministic run killed after its first mid-epoch checkpoint and
     resumed, against the same run uninterrupted (final weights compared bit for bit and max |diff|)
  5. bench/gpu.py, reduced rows: ResNet-50 (a)(b)(c)(d) at 128 and 224 px

    bash bench/gpu_check.sh                 # on the device: carried wheels first (docs/GPU_RUN.md)
    python bench/gpu_check.py --tiny        # CPU rehearsal: resnet18, 32/48 px, 32 images, ~1 min

A step that fails or times out is a FAIL row with its log under --out/logs/; the later steps still
run. Exit status 0 only when no step failed (skips are not failures).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(HERE))

import gpu_inputs  # noqa: E402  (bench/gpu_inputs.py)

PREP_SIZES = (160, 320)
FULL = {
    "arch": "resnet50",
    "crops": (128, 224),
    "batch_sizes": (256, 192),
    "images": 2000,
    "classes": 20,
    "val_per_class": 25,
    "workers": None,
    "budget_seconds": 540.0,
    "photos": "real",
}
# step 3's rows (name, extra `train run` flags, epochs) and step 4's flags
RUN_ROWS = (
    ("run-decode-cpu", ("--decode", "cpu"), 2),
    ("run-decode-gpu", ("--decode", "gpu"), 2),
    ("run-fp16", ("--precision", "fp16"), 2),
    ("run-compile", ("--compile",), 1),
)
RESUME_FLAGS = ("--deterministic", "--checkpoint-every-steps", "3", "--seed", "1")
TINY = {
    "arch": "resnet18",
    "crops": (32, 48),
    "batch_sizes": (8, 8),
    "images": 32,  # 4 steps an epoch at batch 8: the kill after step 3 still lands mid-epoch
    "classes": 4,
    "val_per_class": 4,
    "workers": 1,
    "budget_seconds": 600.0,
    "photos": "synthetic",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal at tiny sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu-check"))
    parser.add_argument("--cache", type=Path, help="inputs cache [default: OUT/cache]")
    parser.add_argument(
        "--wallpaper-dir", type=Path, help="fixture photos where /usr/share/wallpapers is missing"
    )
    parser.add_argument(
        "--photos",
        choices=("real", "synthetic"),
        help="fixture images: real photos, or prep sample's generated ones [--tiny's default]",
    )
    parser.add_argument(
        "--budget-seconds", type=float, help="whole call; later steps get what is left"
    )
    parser.add_argument(
        "--skip", default="", help="comma list of steps to leave out: tests,runs,resume,bench"
    )
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key, None) is None:  # a preset fills only what the command line left out
            setattr(args, key, value)
    args.workers = args.workers or max(1, len(os.sched_getaffinity(0)) - 2)
    args.cache = args.cache or args.out / "cache"
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


class Steps:
    """Runs commands under one deadline; keeps one result row per step for the final table."""

    def __init__(self, out_dir: Path, budget_seconds: float):
        self.started = time.monotonic()
        self.deadline = self.started + budget_seconds
        self.log_dir = out_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, name: str, status: str, seconds: float, detail: str) -> dict:
        row = {"step": name, "status": status, "seconds": round(seconds, 1), "detail": detail}
        self.rows.append(row)
        print(f"[{time.monotonic() - self.started:6.0f} s] {name}: {status} {detail}", flush=True)
        return row

    def run(
        self, name: str, command: list[str], limit: float, reserve: float = 20.0
    ) -> tuple[int, str]:
        """(exit status, output); status 124 when its time ran out, -1 when none was left."""
        timeout = min(limit, self.left() - reserve)
        if timeout < 5:
            return -1, "no time left in the budget"
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = 124
        return code, log_path.read_text(errors="replace")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def build_inputs(args: argparse.Namespace, steps: Steps) -> Path | None:
    """Fixture (the one bench/gpu.py reuses), a val split of hard links, train+val shards."""
    started = time.monotonic()
    try:
        fixture_dir = args.cache / f"fixture-{args.photos}-{args.images}"
        record = gpu_inputs.build_inputs_fixture(
            fixture_dir, args.images, args.classes, args.wallpaper_dir, args.photos
        )
        shards_dir = args.cache / f"shards-{fixture_dir.name}"
        gpu_inputs.build_shards(
            fixture_dir, shards_dir, list(PREP_SIZES), record["stats"]["count"], args.workers
        )
        val_root = link_val_split(fixture_dir / "folders", args.val_per_class)
    except (SystemExit, Exception) as err:  # noqa: BLE001  (the table says what failed)
        steps.add(
            "inputs", "FAIL", time.monotonic() - started, f"{type(err).__name__}: {err}"[:200]
        )
        return None
    command = [
        sys.executable,
        "-m",
        "prep.cli",
        "build-lmdb",
        "--src",
        str(val_root),
        "--out",
        str(shards_dir),
        "--split",
        "val",
        "-q",
        "--workers",
        str(args.workers),
    ]
    command += [a for size in PREP_SIZES for a in ("--size", str(size))]
    if not all((shards_dir / f"val-{size}" / "manifest.json").is_file() for size in PREP_SIZES):
        code, output = steps.run("inputs-val", command, limit=300)
        if code != 0:
            steps.add("inputs", "FAIL", time.monotonic() - started, last_line(output))
            return None
    steps.add(
        "inputs",
        "ok",
        time.monotonic() - started,
        f"{record['stats']['count']} train JPEGs, {args.val_per_class}/class val; shards "
        f"{shards_dir}",
    )
    return shards_dir


def link_val_split(folders: Path, per_class: int) -> Path:
    """folders/val/<wnid>/: hard links to the first images of each train class (a check of the
    pipeline, not of accuracy: val overlapping train does not matter here)."""
    for class_dir in sorted((folders / "train").iterdir()):
        target = folders / "val" / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.glob("*.JPEG"))[:per_class]:
            if not (target / image.name).exists():
                os.link(image, target / image.name)
    return folders


def gpu_test_files(tests_dir: Path) -> list[str]:
    """The test files (tests/ and its subfolders) that hold a CUDA-marked test."""
    return sorted(
        str(p.relative_to(tests_dir.parent))
        for p in tests_dir.rglob("test_*.py")
        if "mark.gpu" in p.read_text() or "mark.cuda" in p.read_text()
    )


def gpu_tests(args: argparse.Namespace, steps: Steps) -> None:
    files = gpu_test_files(REPO / "tests")
    started = time.monotonic()
    code, output = steps.run(
        "tests-gpu",
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
        limit=240,
    )
    summary = next(
        (
            line
            for line in reversed(output.splitlines())
            if " in " in line and any(w in line for w in ("passed", "failed", "skipped", "error"))
        ),
        last_line(output),
    )
    # exit 5: every test deselected or skipped (CPU): not a failure
    status = "ok" if code in (0, 5) else ("TIMEOUT" if code == 124 else "FAIL")
    steps.add("tests-gpu", status, time.monotonic() - started, summary.strip("= "))


def write_phases(out_dir: Path, args: argparse.Namespace, epochs: int) -> Path:
    phases = [
        {
            "epochs": [i, i + 1],
            "prep_size": prep_size,
            "crop_size": crop,
            "batch_size": batch,
            "lr": [0.1, 0.05] if i == 0 else [0.05, 0.0],
        }
        for i, (prep_size, crop, batch) in enumerate(zip(PREP_SIZES, args.crops, args.batch_sizes))
    ]
    path = out_dir / f"phases-{epochs}ep.json"
    path.write_text(
        json.dumps(
            {"recipe": {"arch": args.arch, "label_smoothing": 0.1}, "phases": phases[:epochs]}
        )
    )
    return path


def train_command(args, phases: Path, shards: Path, run_dir: Path, extra: list[str]) -> list[str]:
    device = "cpu" if args.tiny else "cuda"
    return [
        sys.executable,
        "-m",
        "train",
        "run",
        "--phases",
        str(phases),
        "--data",
        str(shards),
        "--out",
        str(run_dir),
        "--device",
        device,
        "--workers",
        str(args.workers),
        "--no-progress",
        "--no-tensorboard",
        "--log-every",
        "2",
        *extra,
    ]


def epochs_summary(run_dir: Path) -> str:
    from train.run.metrics import read_metrics

    records = read_metrics(run_dir)
    return "; ".join(
        f"ep{r['epoch']} {r.get('img_per_s', 0):,.0f} img/s top1 {r.get('top1')}" for r in records
    )


def train_runs(args: argparse.Namespace, steps: Steps, shards: Path) -> None:
    for name, extra, epochs in RUN_ROWS:
        if args.tiny and name != "run-decode-cpu":
            steps.add(name, "skip", 0, "no CUDA (CPU rehearsal)")
            continue
        run_dir = args.out / "runs" / name
        started = time.monotonic()
        command = train_command(
            args, write_phases(args.out, args, epochs), shards, run_dir, list(extra)
        )
        code, output = steps.run(name, command, limit=240 if name == "run-compile" else 150)
        status = "ok" if code == 0 else ("TIMEOUT" if code == 124 else "FAIL")
        detail = epochs_summary(run_dir) if code == 0 else last_line(output)
        steps.add(name, status, time.monotonic() - started, detail)


def resume_check(args: argparse.Namespace, steps: Steps, shards: Path) -> None:
    """Deterministic kernels both times; kill -9 once a mid-epoch checkpoint exists, resume."""
    phases = write_phases(args.out, args, 2)
    extra = list(RESUME_FLAGS)
    reference, killed = args.out / "runs" / "resume-reference", args.out / "runs" / "resume-killed"
    started = time.monotonic()
    code, output = steps.run(
        "resume-reference", train_command(args, phases, shards, reference, extra), 150
    )
    if code != 0:
        steps.add(
            "resume", "FAIL", time.monotonic() - started, "reference run: " + last_line(output)
        )
        return
    command = train_command(args, phases, shards, killed, extra)
    with open(steps.log_dir / "resume-killed.log", "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        checkpoint = killed / "checkpoints" / "last.pt"
        wait_until = time.monotonic() + min(120, steps.left() - 60)
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < wait_until:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if not checkpoint.exists():
        steps.add("resume", "FAIL", time.monotonic() - started, "no checkpoint before the kill")
        return
    code, output = steps.run("resume-resumed", command + ["--resume", "auto"], 150)
    if code != 0:
        steps.add("resume", "FAIL", time.monotonic() - started, "resumed run: " + last_line(output))
        return
    bits_equal, max_diff = compare_weights(reference, killed)
    # bit-identical is the CPU contract; on CUDA --deterministic should give it too, and a small
    # difference (bf16 rounding of a reordered reduction) is reported, not hidden
    status = "ok" if bits_equal else ("warn" if max_diff < 1e-2 else "FAIL")
    steps.add(
        "resume",
        status,
        time.monotonic() - started,
        f"killed at {checkpoint_steps(killed)}; final weights bit-identical: {bits_equal}, "
        f"max |diff| {max_diff:.3g}",
    )


def checkpoint_steps(run_dir: Path) -> str:
    """Where the resumed run picked up, from event.log's "Resumed from ... at epoch E step S"."""
    log = (
        (run_dir / "event.log").read_text(errors="replace")
        if (run_dir / "event.log").exists()
        else ""
    )
    resumed = [
        line.split(" at ", 1)[-1] for line in log.splitlines() if line.startswith("Resumed from")
    ]
    return resumed[0].strip() if resumed else "an unknown point (no 'Resumed from' in event.log)"


def compare_weights(a_dir: Path, b_dir: Path) -> tuple[bool, float]:
    import torch

    a = torch.load(a_dir / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)[
        "model"
    ]
    b = torch.load(b_dir / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)[
        "model"
    ]
    equal, worst = a.keys() == b.keys(), 0.0
    for key in a:
        if a[key].is_floating_point():
            worst = max(worst, (a[key].float() - b[key].float()).abs().max().item())
        equal = equal and torch.equal(a[key], b[key])
    return equal, worst


def gpu_table(args: argparse.Namespace, steps: Steps) -> None:
    command = [
        sys.executable,
        str(HERE / "gpu.py"),
        "--cache",
        str(args.cache),
        "--json-out",
        str(args.out / "gpu.json"),
        "--budget-seconds",
        str(max(30, steps.left() - 25)),
    ]
    if args.wallpaper_dir:
        command += ["--wallpaper-dir", str(args.wallpaper_dir)]
    command += ["--photos", args.photos]
    if args.tiny:
        command += ["--tiny", "--configs", "a,b,d", "--variants", ""]
    else:
        command += [
            "--archs",
            "resnet50",
            "--sizes",
            "128,224",
            "--arch-sizes",
            "",
            "--configs",
            "a,b,c,d",
            "--variants",
            "",
            "--workers",
            str(args.workers),
        ]
    started = time.monotonic()
    code, output = steps.run("bench-gpu", command, limit=steps.left() - 10, reserve=5)
    lines = output.splitlines()
    # gpu.py's final table
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if line.startswith("machine: ")
            and i + 1 < len(lines)
            and lines[i + 1].startswith("config ")
        ),
        None,
    )
    table = (
        []
        if start is None
        else lines[start : lines.index("", start) if "" in lines[start:] else None]
    )
    (args.out / "gpu-table.txt").write_text("\n".join(table) + "\n")
    status = "ok" if code == 0 else ("TIMEOUT" if code == 124 else "FAIL")
    steps.add(
        "bench-gpu",
        status,
        time.monotonic() - started,
        f"{max(len(table) - 2, 0)} rows -> gpu-table.txt" if code == 0 else last_line(output),
    )


def environment_line() -> str:
    import torch
    import torchvision

    from formats.jpeg import codec_report

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return (
        f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision "
        f"{torchvision.__version__}, python {sys.version.split()[0]}, codecs {codec_report()}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.out, args.budget_seconds)
    print(f"gpu_check: {environment_line()}", flush=True)
    shards = build_inputs(args, steps)
    if "tests" not in args.skip:
        gpu_tests(args, steps)
    if shards is not None and "runs" not in args.skip:
        train_runs(args, steps, shards)
    if shards is not None and "resume" not in args.skip:
        resume_check(args, steps, shards)
    if "bench" not in args.skip:
        gpu_table(args, steps)
    summary = {
        "environment": environment_line(),
        "steps": steps.rows,
        "seconds": round(time.monotonic() - steps.started, 1),
    }
    (args.out / "check.json").write_text(json.dumps(summary, indent=1))
    print("\n| step | status | s | detail |\n|---|---|---|---|")
    for row in steps.rows:
        print(f"| {row['step']} | {row['status']} | {row['seconds']:.0f} | {row['detail']} |")
    table = args.out / "gpu-table.txt"
    if table.exists():
        print("\n" + table.read_text())
    return 1 if any(row["status"] in ("FAIL", "TIMEOUT") for row in steps.rows) else 0


if __name__ == "__main__":
    sys.exit(main())

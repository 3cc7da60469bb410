"""bench/scale.py's training-side step: what a run pays at ImageNet's size before its first
step, through the public API (dataset open, sampler plans, rect-val batches, a loader's first
batch) and the CLI (`train run --dry-run`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from scale_steps import CROP, REPO, TRAIN_BATCH, VAL_BATCH, median_seconds

RANKS = (1, 8, 64)
DRY_RUN_PHASES = {  # imagenet18's epochs and batches, on the rehearsal's 160 px shards
    "phases": [
        {
            "epochs": [0, 13],
            "prep_size": 160,
            "crop_size": 128,
            "batch_size": 256,
            "lr": [1.0, 2.0],
        },
        {
            "epochs": [13, 25],
            "prep_size": 160,
            "crop_size": 160,
            "batch_size": 224,
            "lr": [2.0, 0.25],
        },
        {
            "epochs": [25, 28],
            "prep_size": 160,
            "crop_size": 160,
            "batch_size": 128,
            "lr": [0.25, 0.0],
            "rect_val": True,
        },
    ]
}


def _sampler_plan_seconds(num_images: int, world_size: int) -> float:
    from train.data.samplers import TrainBatchSampler

    # tiny mode: fewer images than ranks x batch
    batch_size = max(1, min(TRAIN_BATCH, num_images // world_size))

    def plan():
        sampler = TrainBatchSampler(
            num_images, batch_size, rank=world_size - 1, world_size=world_size, seed=0
        )
        sampler.set_epoch(7)
        return list(sampler)

    return median_seconds(plan)


def _first_batch_seconds(train_dir: Path) -> dict:
    from train.data import TrainLoader
    from train.data.crops import TrainCrop

    started = time.perf_counter()
    loader = TrainLoader(train_dir, TRAIN_BATCH, TrainCrop(CROP, min_scale=0.35), workers=2, seed=0)
    built = time.perf_counter()
    loader.set_epoch(3)
    images, _ = next(iter(loader))
    first = time.perf_counter()
    loader.close()
    return {
        "construct_s": built - started,
        "first_batch_s": first - built,
        "batch_shape": list(images.shape),
    }


def _dry_run_seconds(data_dir: Path, work_dir: Path) -> dict:
    phases = work_dir / "phases-160.json"
    phases.write_text(json.dumps(DRY_RUN_PHASES))
    timings = {}
    # what any `train run` pays before reading its data: python, typer, then the imports of
    # train.run.main (torch and torchvision among them)
    for name, args in (
        ("python_and_imports_s", ["-m", "train.cli", "--help"]),
        ("train_run_imports_s", ["-c", "import train.run.main"]),
        (
            "dry_run_s",
            [
                "-m",
                "train.cli",
                "run",
                "--phases",
                str(phases),
                "--data",
                str(data_dir),
                "--dry-run",
            ],
        ),
    ):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
        timings[name] = time.perf_counter() - started
        if result.returncode:
            raise SystemExit(f"train {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return timings


def measure_train_side(train_dir: Path, val_dir: Path, work_dir: Path) -> dict:
    from formats.dataset import RecordDataset
    from formats.manifest import read_manifest
    from train.data import ValLoader
    from train.data.samplers import rect_val_batches

    results = {
        "manifest_read_s": median_seconds(lambda: read_manifest(train_dir)),
        "dataset_open_s": median_seconds(lambda: RecordDataset(train_dir)),
        "val_dataset_open_s": median_seconds(lambda: RecordDataset(val_dir)),
    }
    num_images = len(RecordDataset(train_dir))
    results["num_train_records"] = num_images
    results["sampler_plan_s"] = {str(w): _sampler_plan_seconds(num_images, w) for w in RANKS}
    ratios = RecordDataset(val_dir).aspect_ratios()
    results["num_val_records"] = len(ratios)
    results["rect_val_batches_s"] = {
        str(w): median_seconds(lambda: rect_val_batches(ratios, VAL_BATCH, rank=0, world_size=w))
        for w in (1, 8)
    }
    results["rect_val_loader_construct_s"] = median_seconds(
        lambda: ValLoader(val_dir, VAL_BATCH, CROP, rect=True, workers=0).close()
    )
    results["train_loader"] = _first_batch_seconds(train_dir)
    results.update(_dry_run_seconds(train_dir.parent, work_dir))
    return results

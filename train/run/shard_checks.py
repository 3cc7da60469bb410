"""What each shard directory must be before a run starts (split, prep_size, labels, batch fit)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from formats import DatasetError
from formats.manifest import load_records, read_manifest
from formats.record import MANIFEST_FILE, RECORDS_FILE
from train.errors import TrainError
from train.plan.schedule import Schedule


@dataclass(frozen=True)
class ShardInfo:
    """One shard directory as its manifest describes it."""

    classes: list[str]
    split: str
    prep_size: int
    num_images: int


def read_shard_info(dataset_dir: Path) -> ShardInfo:
    """The manifest's classes, split, prep_size and count; DatasetError for a label outside
    [0, num_classes) in records.npy (checked for every record: one vectorized pass)."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    labels = load_records(dataset_dir, manifest)["label"].astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
    if bad.size:
        first = int(bad[0])
        raise DatasetError(
            f"{dataset_dir / RECORDS_FILE}: record {first} has label "
            f"{int(labels[first])}, outside [0, {manifest.num_classes}) for its "
            f"{manifest.num_classes} classes ({bad.size} such record(s)); the "
            "table is damaged: run prep verify, then rebuild"
        )
    return ShardInfo(list(manifest.classes), manifest.split, manifest.prep_size, manifest.count)


def check_shard_info(info: ShardInfo, dir_name: str, split: str, prep_size: int) -> None:
    """The directory `dir_name` holds `split` images stored at `prep_size`, as its name says."""
    if info.split != split:
        raise TrainError(
            f"{dir_name}/ holds a {info.split!r} dataset (its {MANIFEST_FILE} "
            f"says so), not {split!r}: build {dir_name}/ from the {split} images"
        )
    if info.prep_size != prep_size:
        raise TrainError(
            f"{dir_name}/ holds images of prep_size {info.prep_size} (its "
            f"{MANIFEST_FILE} says so), not {prep_size}: build it with --size "
            f"{prep_size}, or name it {split}-{info.prep_size}/ and use that"
        )


def check_global_batches(
    schedule: Schedule, num_train_images: dict[str, int], world_size: int
) -> None:
    """Each phase's global batch (batch_size x ranks x accum_steps) fits in its training set:
    the training sampler yields whole global batches only."""
    for index, phase in enumerate(schedule.phases):
        global_batch = phase.batch_size * world_size * phase.accum_steps
        num_images = num_train_images[phase.train_dir_name]
        if global_batch > num_images:
            raise TrainError(
                f"phase {index}: global batch {global_batch} (batch_size "
                f"{phase.batch_size} x {world_size} rank(s) x accum_steps "
                f"{phase.accum_steps}) is larger than {phase.train_dir_name}/'s "
                f"{num_images} images: not one step per epoch"
            )


def check_data_dir(data_dir: Path) -> None:
    """--data names the directory holding train-<N>/ and val-<N>/, not one of them."""
    data_dir = Path(data_dir)
    if (data_dir / MANIFEST_FILE).is_file():
        raise TrainError(
            f"--data {data_dir} is itself a dataset directory ({data_dir.name}/); "
            f"pass the directory that holds the train-<N>/ and val-<N>/ shards, "
            f"--data {data_dir.parent}"
        )

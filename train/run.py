"""`train run`: one training run from a phases file, start to finish or to a clean stop.

Orchestration only, in this order: check the arguments, schedule, recipe (train.config,
train.phases) and shards (train.shards), all before any process group or GPU work, so a bad
input costs one line and no time; `--dry-run` prints the table (train.dry_run) and stops; join
torchrun's process group (train.dist); then train.epochs builds the model and its trainer
(train.model, train.step), resumes (train.checkpoint) and runs the epochs: the epoch's loaders
(train.shards.LiveLoaders), its steps (train.loop.train_steps), evaluation, metrics
(train.metrics) and a checkpoint.

Data comes through a `DataSource` (default: `ShardData`), the one seam tests use to train on
tiny in-memory batches.
"""

from __future__ import annotations

from typing import Any

from train.config import Recipe, RecipeError, RunConfig, TrainError, check_config
from train.dist import init_distributed, shutdown
from train.dry_run import dry_run_text
from train.phases import LoadedSchedule, load_schedule
from train.report import DEFAULT_TARGETS
from train.schedule import ScheduleError
from train.shards import DataSource, ShardData, check_shards
from train.signals import StopFlag


def load_inputs(config: RunConfig) -> tuple[LoadedSchedule, Recipe]:
    check_config(config)
    try:
        loaded = load_schedule(config.phases_path, full_prep_size=config.full_prep_size)
        recipe = Recipe.from_mapping(
            loaded.recipe, arch=config.arch, label_smoothing=config.label_smoothing,
            mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
            ema_decay=config.ema_decay, val_flip_tta=config.flip_tta)
    except (ScheduleError, RecipeError) as exc:
        raise TrainError(str(exc) if isinstance(exc, ScheduleError)
                         else f"{config.phases_path}: {exc}") from None
    return loaded, recipe


def targets_of(config: RunConfig, recipe: Recipe) -> dict[str, float]:
    """--target beats the recipe's "targets", which beat DEFAULT_TARGETS."""
    targets = dict(recipe.targets) or dict(DEFAULT_TARGETS)
    targets.update(dict(config.targets))
    return targets


def run(config: RunConfig, data: DataSource | None = None) -> dict[str, Any]:
    """Train as the config says; returns the final metrics record (rank 0; {} elsewhere)."""
    loaded, recipe = load_inputs(config)
    if data is None and config.data_dir is not None:
        data = ShardData(config.data_dir)
    if config.dry_run:
        classes = check_shards(loaded.schedule, data) if data is not None else None
        print(dry_run_text(config, loaded, recipe, classes))
        return {}
    if data is None:
        raise TrainError("--data is required (the directory holding train-<N>/ and val-<N>/)")
    classes = check_shards(loaded.schedule, data)
    from train.epochs import Training  # torch-heavy: imported after the cheap checks

    env = init_distributed(config.device)
    try:
        with StopFlag() as stop:
            training = Training(config, loaded, recipe, data, env, len(classes), stop)
            return training.train(targets_of(config, recipe))
    finally:
        shutdown(env)

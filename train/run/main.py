"""`train run`: check every input before any process group, then train (train.run.epochs)."""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Any

from train.engine.launch import launch_world_size, processes_per_node, say
from train.errors import RecipeError, ScheduleError, TrainError
from train.plan.config import Recipe, RunConfig, available_cpus, cap_workers, check_config
from train.plan.dry_run import dry_run_text
from train.plan.phases import LoadedSchedule, load_schedule
from train.plan.world_size import plan_world
from train.run.metrics import tensorboard_writer
from train.run.report import DEFAULT_TARGETS
from train.run.shards import DataSource, ShardData, check_shards
from train.run.signals import StopFlag

IMAGENET_CLASSES = 1000  # the model a dry run without --data checks


def load_inputs(config: RunConfig) -> tuple[LoadedSchedule, Recipe]:
    check_config(config)
    try:
        loaded = load_schedule(config.phases_path, full_prep_size=config.full_prep_size)
        recipe = Recipe.from_mapping(loaded.recipe, **config.recipe)
    except (ScheduleError, RecipeError) as exc:
        raise TrainError(
            str(exc) if isinstance(exc, ScheduleError) else f"{config.phases_path}: {exc}"
        ) from None
    return loaded, recipe


def targets_of(config: RunConfig, recipe: Recipe) -> dict[str, float]:
    """--target beats the recipe's "targets", which beat DEFAULT_TARGETS."""
    targets = dict(recipe.targets) or dict(DEFAULT_TARGETS)
    targets.update(dict(config.targets))
    return targets


def check_recipe_model(
    config: RunConfig, loaded: LoadedSchedule, recipe: Recipe, num_classes: int
) -> None:
    """The recipe's model builds and takes every crop size of the schedule (train.engine.model)."""
    from train.engine.model import check_model

    phases = loaded.schedule.phases  # a ramp's crops lie between its first and last
    train_crops = [p.crop_size_at(e) for p in phases for e in (p.epochs[0], p.epochs[1] - 1)]
    try:
        check_model(recipe, num_classes, train_crops, [p.val_crop_size for p in phases])
    except RecipeError as exc:
        raise TrainError(f"{config.phases_path}: {exc}") from None


def run(config: RunConfig, data: DataSource | None = None) -> dict[str, Any]:
    """Train as the config says; returns the final metrics record (rank 0; {} elsewhere)."""
    loaded, recipe = load_inputs(config)
    config, warnings = cap_workers(config, available_cpus(), processes_per_node())
    for warning in warnings:
        say(warning)
    if data is None and config.data_dir is not None:
        data = ShardData(config.data_dir)
    world_size = launch_world_size()
    # The schedule this world size trains (--global-batch); EpochLoop plans it again, and
    # re-plans it on a resume from another world size.
    world = plan_world(loaded.schedule, recipe.tuned_num_gpus, world_size, config.global_batch)
    planned = dataclasses.replace(loaded, schedule=world.schedule)
    if config.dry_run:
        classes = check_shards(world.schedule, data, world_size) if data is not None else None
        text = dry_run_text(config, planned, recipe, classes, world.lines)
        print(text, flush=True)  # before torch loads
        check_recipe_model(config, planned, recipe, len(classes) if classes else IMAGENET_CLASSES)
        print(f"model: {recipe.arch} builds and takes every crop of the schedule")
        return {}
    if data is None:
        raise TrainError("--data is required (the directory holding train-<N>/ and val-<N>/)")
    classes = check_shards(world.schedule, data, world_size)
    check_recipe_model(config, planned, recipe, len(classes))
    if recipe.init and config.resume is None and not Path(recipe.init).is_file():
        # A fresh start reads it; fail here, before the process group and --overwrite.
        raise TrainError(f"init: {recipe.init}: no such weights file")
    if config.tensorboard:
        tensorboard_writer()
    from train.engine.dist import init_distributed, shutdown  # torch: after the cheap checks
    from train.run.epochs import EpochLoop
    from train.run.run_dir import hold_run_dir

    env = init_distributed(config.device)
    training = None
    try:
        with StopFlag() as stop, hold_run_dir(config.run_dir, env):
            training = EpochLoop(config, loaded, recipe, data, env, len(classes), stop)
            return training.train(targets_of(config, recipe))
    except BaseException as exc:
        # The frames it passed through hold the EpochLoop (and its DDP model): free them, so
        # nothing holds the process group when shutdown() destroys it.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if training is not None:
            training.release()
        del training
        shutdown(env)

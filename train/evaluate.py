"""`train eval`: exact top-1/top-5 of a run's checkpoint or a torchvision/timm state_dict on
validation shards, with the run's own loaders and evaluation pass (DDP: counts summed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats import DatasetError, split_dir_name
from formats.record import MANIFEST_FILE
from train.data.constants import DEFAULT_VAL_CROP_RATIO
from train.errors import RecipeError, ScheduleError, TrainError, one_line
from train.plan.config import check_arch
from train.plan.rebuilds import val_resize_size
from train.plan.schedule import Schedule
from train.run import checkpoint as ckpt
from train.run.shard_checks import read_shard_info

DEFAULT_CROP_SIZE = 224  # a state_dict's crop without --crop-size (torchvision's eval crop)


@dataclass(frozen=True)
class EvalConfig:
    source: Path  # a run directory, one of our checkpoints, or a state_dict file
    data_dir: Path  # a val shard directory, or the directory holding val-<N>/
    checkpoint: str | None = None  # a run directory's best | final | last
    arch: str | None = None  # a state_dict's model (timm/<name> for timm's)
    prep_size: int | None = None
    crop_size: int | None = None
    resize_size: int | None = None
    rect: bool | None = None  # None: the checkpoint's phase's rect_val (else center)
    ema: bool = False
    flip_tta: bool = False
    batch_size: int = 100
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    decode: str = "cpu"
    channels_last: bool = True


@dataclass(frozen=True)
class Weights:
    """What to evaluate: the model's constructor input and its weights, and the phase whose
    evaluation settings a checkpoint's epoch used (None for a state_dict)."""

    path: Path
    arch: str
    recipe: Any  # train.plan.config.Recipe of a checkpoint, else None
    num_classes: int | None  # a checkpoint's; a state_dict's comes from its head
    weights: dict
    epoch: int | None
    precision: str | None  # the run's (what its evaluations used), else None
    phase: Any  # train.plan.schedule.Phase of the checkpoint's epoch, else None


def read_weights(config: EvalConfig) -> Weights:
    from train.engine.init_weights import is_checkpoint, read_file, weights_of
    from train.plan.config import Recipe

    source = Path(config.source)
    if not source.exists():
        raise TrainError(f"{source}: no such run directory or weights file")
    if source.is_file() and config.checkpoint:
        raise TrainError(f"--checkpoint picks a run directory's checkpoint; {source} is a file")
    path = ckpt.find_for_export(source, config.checkpoint) if source.is_dir() else source
    state = read_file(path)
    if not is_checkpoint(state):
        if config.arch is None:
            raise TrainError(
                f"{path} is a state_dict: name its model with --arch (resnet50, timm/<name>)"
            )
        try:
            check_arch(config.arch)
        except RecipeError as exc:
            reason = str(exc).removeprefix("recipe key 'arch': ")
            raise TrainError(f"--arch {reason}") from None
        weights = weights_of(state, path, ema=config.ema)
        return Weights(path, config.arch, None, None, weights, None, None, None)
    state = ckpt.check_loaded(state, path)  # the version and field checks of a resume
    if config.arch is not None and config.arch != state["arch"]:
        raise TrainError(f"--arch {config.arch}: {path} is a checkpoint of {state['arch']}")
    try:
        recipe = Recipe.from_mapping(state["recipe"])
        schedule = Schedule.from_dicts(state["schedule"])
        # the epoch these weights finished (a mid-epoch last.pt: the one in progress)
        trained = state["epoch"] - 1 if state["step"] == 0 else state["epoch"]
        phase = schedule.phase_at(min(max(trained, 0), schedule.num_epochs - 1))
    except (RecipeError, ScheduleError) as exc:
        raise TrainError(f"{path}: {exc}") from None
    weights = weights_of(state, path, ema=config.ema)
    return Weights(
        path,
        state["arch"],
        recipe,
        state["num_classes"],
        weights,
        state["epoch"],
        state["precision"],
        phase,
    )


@dataclass(frozen=True)
class ValSettings:
    dataset_dir: Path
    crop_size: int
    resize_size: int | None  # None with rect
    rect: bool

    def describe(self) -> str:
        if self.rect:
            return f"rect {self.crop_size}"
        return f"center {self.crop_size} (resize {self.resize_size})"


def val_settings(config: EvalConfig, found: Weights) -> ValSettings:
    """--prep-size/--crop-size/--resize-size/--rect, else what the run evaluated the
    checkpoint's epoch with, else torchvision's 256 -> 224."""
    phase = found.phase
    data_dir = Path(config.data_dir)
    if (data_dir / MANIFEST_FILE).is_file():
        dataset_dir = data_dir
    else:
        prep_size = config.prep_size or (phase.val_prep_size if phase else None)
        if prep_size is None:
            raise TrainError(
                f"--data {data_dir} is no shard directory: name one (--data D/val-256) or "
                "pass --prep-size"
            )
        dataset_dir = data_dir / split_dir_name("val", prep_size)
    rect = config.rect if config.rect is not None else bool(phase and phase.rect_val)
    crop = config.crop_size or (phase.val_crop_size if phase else DEFAULT_CROP_SIZE)
    if config.resize_size is not None:
        resize = config.resize_size
    elif phase is not None and crop == phase.val_crop_size:
        resize = val_resize_size(phase)
    else:
        resize = round(crop / DEFAULT_VAL_CROP_RATIO)
    if resize < crop:
        raise TrainError(f"--resize-size {resize} is smaller than the crop {crop}")
    if rect and config.resize_size is not None:
        raise TrainError("--resize-size is for the center crop; --rect sizes by aspect ratio")
    return ValSettings(dataset_dir, crop, None if rect else resize, rect)


def check_data(settings: ValSettings) -> int:
    """The val shards' class count; a missing or non-val directory is one line."""
    try:
        info = read_shard_info(settings.dataset_dir)
    except (DatasetError, OSError, ValueError) as exc:
        raise TrainError(f"--data: {settings.dataset_dir}: {one_line(exc, 200)}") from None
    if info.split != "val":
        raise TrainError(f"--data: {settings.dataset_dir} holds {info.split!r} images, not 'val'")
    return len(info.classes)


def build(found: Weights, num_classes: int):
    """The model with the weights loaded strictly; a class count unlike the shards' refused."""
    from train.engine.init_weights import head_classes, load_weights
    from train.engine.model import build_model, create_model

    if found.num_classes is not None and found.num_classes != num_classes:
        raise TrainError(
            f"{found.path}: a model of {found.num_classes} classes, the shards have {num_classes}"
        )
    try:
        if found.recipe is not None:
            model = build_model(found.recipe, num_classes)
        else:
            model = create_model(found.arch, num_classes)
    except (ImportError, RuntimeError, ValueError, TypeError) as exc:
        raise TrainError(f"cannot build {found.arch}: {one_line(exc)}") from None
    if load_weights(model, found.weights, f"{found.path} ({found.arch})"):  # backbone first
        had = head_classes(found.weights, model)
        raise TrainError(f"{found.path}: weights for {had} classes, the shards have {num_classes}")
    return model


def eval_precision(config: EvalConfig, found: Weights, device) -> str:
    """--precision; its "auto" is the run's own precision (fp16 only on CUDA), so a checkpoint
    evaluates as its run did, else bf16 on CUDA and fp32 on CPU."""
    if config.precision != "auto" or found.precision is None:
        return config.precision
    return found.precision if found.precision != "fp16" or device.type == "cuda" else "auto"


def evaluate_weights(config: EvalConfig) -> dict[str, Any]:
    """Every check before any process group, then one evaluation pass per rank, summed."""
    import torch

    from train.data.loaders import ValLoader
    from train.data.prefetch import DevicePrefetcher
    from train.engine.dist import all_reduce_sum, init_distributed, shutdown
    from train.engine.loop import EvalSums, evaluate
    from train.engine.step import resolve_precision

    for flag, value, low in (
        ("--batch-size", config.batch_size, 1),
        ("--workers", config.workers, 0),
        ("--prep-size", config.prep_size, 1),
        ("--crop-size", config.crop_size, 1),
        ("--resize-size", config.resize_size, 1),
    ):
        if value is not None and value < low:
            raise TrainError(f"{flag} must be >= {low}, got {value}")
    found = read_weights(config)
    settings = val_settings(config, found)
    num_classes = check_data(settings)
    model = build(found, num_classes)
    env = init_distributed(config.device)
    loader = None
    try:
        precision = resolve_precision(eval_precision(config, found, env.device), env.device)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model = model.to(env.device, memory_format=memory_format)
        loader = ValLoader(
            settings.dataset_dir,
            config.batch_size,
            settings.crop_size,
            rank=env.rank,
            world_size=env.world_size,
            workers=config.workers,
            rect=settings.rect,
            resize_size=settings.resize_size,
            decode=config.decode,
            device=str(env.device) if config.decode == "gpu" else None,
        )
        batches = DevicePrefetcher(loader, env.device, channels_last=config.channels_last)
        sums = evaluate(model, batches, env.device, precision, config.flip_tta)
        result = EvalSums.from_tensor(all_reduce_sum(env, sums))
    finally:
        if loader is not None:
            loader.close()
        del model
        shutdown(env)
    return {
        "top1": result.top1,
        "top5": result.top5,
        "val_loss": result.loss,
        "images": int(result.count),
        "source": str(found.path),
        "arch": found.arch,
        "epochs_done": found.epoch,  # a checkpoint's; None for a state_dict
        "ema": config.ema,
        "flip_tta": config.flip_tta,
        "crop": settings.describe(),
        "data": str(settings.dataset_dir),
        "precision": precision,
        "world_size": env.world_size,
    }

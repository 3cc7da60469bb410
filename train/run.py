"""`train run`: one training run from a phases file, start to finish or to a clean stop.

Order of events: load and check the schedule, recipe and shards (all before any process group
or GPU work, so a bad input costs one line and no time); join torchrun's process group; build
the model, optimizer and EMA; resume if asked; warm each phase's shape when compiling; then
epochs of (loaders for the phase, steps, evaluation, metrics, checkpoint).

Data comes through a `DataSource` (default: `ShardData`, shard directories read by
train.data's loaders), the one seam tests use to train on tiny in-memory batches.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from train.augment import TrainCrop
from train.dist import DistEnv, init_distributed, rank_zero_only, shutdown
from train.metrics import environment_info, git_sha
from train.model import Recipe, RecipeError
from train.report import DEFAULT_TARGETS
from train.schedule import (
    TRAIN_LOADER_FIELDS,
    VAL_LOADER_FIELDS,
    LoadedSchedule,
    Phase,
    Schedule,
    ScheduleError,
    format_table,
    load_schedule,
)


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message is one line for `train: error: ...`."""


class Interrupted(TrainError):
    """SIGINT/SIGTERM: a checkpoint was saved; `--resume auto` continues from it."""


@dataclass(frozen=True)
class RunConfig:
    """`train run`'s arguments. None means: take it from the recipe (or its default)."""

    phases_path: Path
    data_dir: Path | None = None
    out_dir: Path | None = None  # None: runs/<phases file stem>
    arch: str | None = None
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    channels_last: bool = True
    seed: int = 0
    resume: str | None = None  # None | "auto" | checkpoint path or run directory
    workers: int = 4
    decode: str = "cpu"  # cpu | gpu (nvjpeg in train.data)
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    checkpoint_every_steps: int = 0  # 0: at epoch ends (and on signals) only
    log_every: int = 20  # steps between progress updates (each one a host sync)
    label_smoothing: float | None = None
    mixup_alpha: float | None = None
    cutmix_alpha: float | None = None
    ema_decay: float | None = None
    flip_tta: bool | None = None
    sync_bn: bool = False
    threads: int | None = None  # torch CPU threads (None: torch's default)
    deterministic: bool | None = None  # None: on for CPU, off for CUDA (cudnn.benchmark)
    full_prep_size: int | None = None  # imagenet18 lists: shards standing in for full size
    targets: tuple[tuple[str, float], ...] = ()  # overrides recipe / DEFAULT_TARGETS
    tensorboard: bool = True
    progress: bool = True
    dry_run: bool = False


# --- data ---------------------------------------------------------------------------------


class DataSource(Protocol):
    """Where batches come from; `dir_name` is a shard directory name (train-160, val-320)."""

    def classes(self, dir_name: str) -> list[str]: ...

    def train_loader(self, dir_name: str, batch_size: int, crop: TrainCrop, *, rank: int,
                     world_size: int, seed: int, workers: int, decode: str,
                     device: str | None) -> Any: ...

    def val_loader(self, dir_name: str, batch_size: int, crop_size: int, *, rank: int,
                   world_size: int, workers: int, rect: bool, decode: str) -> Any: ...

    def prefetcher(self, loader: Any, device: torch.device, channels_last: bool) -> Any: ...


class ShardData:
    """Shard directories under `data_dir`, read by train.data and moved by train.prefetch."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)

    def classes(self, dir_name: str) -> list[str]:
        from formats.manifest import read_manifest

        return list(read_manifest(self.data_dir / dir_name).classes)

    def train_loader(self, dir_name, batch_size, crop, *, rank, world_size, seed, workers,
                     decode, device):
        from train.data import TrainLoader

        return TrainLoader(self.data_dir / dir_name, batch_size, crop, rank=rank,
                           world_size=world_size, seed=seed, workers=workers, decode=decode,
                           device=device)

    def val_loader(self, dir_name, batch_size, crop_size, *, rank, world_size, workers, rect,
                   decode, **device):
        from train.data import ValLoader

        return ValLoader(self.data_dir / dir_name, batch_size, crop_size, rank=rank,
                         world_size=world_size, workers=workers, rect=rect, decode=decode,
                         **device)

    def prefetcher(self, loader, device, channels_last):
        from train.prefetch import DevicePrefetcher

        return DevicePrefetcher(loader, device, channels_last=channels_last)


def check_shards(schedule: Schedule, data: DataSource) -> list[str]:
    """Every shard directory the schedule reads exists, is complete, and has the same classes.

    Returns the class list. Runs before anything is started so a missing `val-320/` fails in
    a second with the phase that needs it, not after hours of training.
    """
    from formats.errors import DatasetError

    classes: list[str] | None = None
    first_dir = ""
    seen: set[str] = set()
    for index, phase in enumerate(schedule.phases):
        for split, dir_name, prep_size in (("train", phase.train_dir_name, phase.prep_size),
                                           ("val", phase.val_dir_name, phase.val_prep_size)):
            if dir_name in seen:
                continue
            seen.add(dir_name)
            try:
                found = data.classes(dir_name)
            except (DatasetError, OSError, ValueError) as exc:
                raise TrainError(f"phase {index} needs {split} shards {dir_name}/ "
                                 f"(prep_size {prep_size}): {exc}") from None
            if classes is None:
                classes, first_dir = found, dir_name
            elif found != classes:
                raise TrainError(f"{dir_name}/ has {len(found)} classes that differ from "
                                 f"{first_dir}/'s {len(classes)}; build both from one source")
    assert classes is not None
    return classes


class Loaders:
    """The live loaders: rebuilt only when what they are built from changes, else adjusted."""

    def __init__(self, data: DataSource, env: DistEnv, config: RunConfig) -> None:
        self.data, self.env, self.config = data, env, config
        self.train: Any = None
        self.val: Any = None
        self._train_key: tuple | None = None
        self._crop: TrainCrop | None = None
        self._val_key: tuple | None = None
        self._val_crop: int | None = None

    def train_for(self, phase: Phase) -> tuple[Any, list[str]]:
        """The train loader for `phase`, and imagenet18-style event lines for what changed."""
        key = tuple(getattr(phase, name) for name in TRAIN_LOADER_FIELDS)
        crop = TrainCrop(phase.crop_size, phase.min_scale)
        events = []
        if key != self._train_key:
            _close(self.train)
            env, cfg = self.env, self.config
            self.train = self.data.train_loader(
                phase.train_dir_name, phase.batch_size, crop, rank=env.rank,
                world_size=env.world_size, seed=cfg.seed, workers=cfg.workers,
                decode=cfg.decode, device=str(env.device) if cfg.decode == "gpu" else None)
            events.append(f"Dataset changed.\nImage size: {phase.crop_size}\nBatch size: "
                          f"{phase.batch_size}\nTrain Directory: {phase.train_dir_name}\n"
                          f"Validation Directory: {phase.val_dir_name}")
            self._train_key = key
        elif crop != self._crop:
            self.train.set_crop(crop)
            events.append(f"Crop changed: {phase.crop_size} px, min_scale {phase.min_scale}")
        self._crop = crop
        return self.train, events

    def val_for(self, phase: Phase) -> Any:
        key = tuple(getattr(phase, name) for name in VAL_LOADER_FIELDS)  # as the dry-run table says
        set_crop_size = getattr(self.val, "set_crop_size", None)
        if key != self._val_key or (self._val_crop != phase.val_crop_size
                                    and set_crop_size is None):
            _close(self.val)
            env, cfg = self.env, self.config
            self.val = self.data.val_loader(
                phase.val_dir_name, phase.batch_size, phase.val_crop_size, rank=env.rank,
                world_size=env.world_size, workers=cfg.workers, rect=phase.rect_val,
                decode=cfg.decode, **({"device": str(env.device)} if cfg.decode == "gpu" else {}))
            self._val_key = key
        elif self._val_crop != phase.val_crop_size:
            set_crop_size(phase.val_crop_size)
        self._val_crop = phase.val_crop_size
        return self.val

    def close(self) -> None:
        _close(self.train)
        _close(self.val)


def _close(loader: Any) -> None:
    close = getattr(loader, "close", None)
    if callable(close):
        close()


# --- configuration --------------------------------------------------------------------------


def check_config(config: RunConfig) -> None:
    """The plain-value arguments, checked before anything is loaded or started."""
    for name, low in (("workers", 0), ("eval_every", 1), ("checkpoint_every_steps", 0),
                      ("log_every", 1)):
        if getattr(config, name) < low:
            raise TrainError(f"--{name.replace('_', '-')} must be >= {low}, got "
                             f"{getattr(config, name)}")
    if config.decode not in ("cpu", "gpu"):
        raise TrainError(f"--decode must be cpu or gpu, got {config.decode!r}")
    if config.device not in ("auto", "cuda", "cpu"):
        raise TrainError(f"--device must be auto, cuda or cpu, got {config.device!r}")
    if config.threads is not None and config.threads < 1:
        raise TrainError(f"--threads must be >= 1, got {config.threads}")


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


def default_out_dir(config: RunConfig) -> Path:
    return config.out_dir if config.out_dir is not None else Path("runs") / config.phases_path.stem


def dry_run_text(config: RunConfig, loaded: LoadedSchedule, recipe: Recipe,
                 classes: list[str] | None) -> str:
    schedule = loaded.schedule
    lines = [f"{config.phases_path}: {schedule.num_epochs} epochs in {len(schedule.phases)} "
             f"phases ({loaded.source_format} format); batch is per GPU",
             f"recipe: {', '.join(f'{k}={v}' for k, v in recipe.to_dict().items())}"]
    if recipe.tuned_num_gpus is not None:
        sizes = sorted({p.batch_size * recipe.tuned_num_gpus for p in schedule.phases})
        lines.append(f"LRs tuned for {recipe.tuned_num_gpus} GPU(s): global batch "
                     f"{', '.join(map(str, sizes))} there; on N GPUs it is batch/gpu x N")
    if recipe.blurpool:
        lines.append("warning: the recipe asks for BlurPool, which this trainer does not "
                     "implement; it trains without it")
    if loaded.note:
        lines.append(f"note: {loaded.note}")
    if classes is not None:
        lines.append(f"shards: all present under {config.data_dir} ({len(classes)} classes)")
    lines += ["", format_table(schedule.table())]
    return "\n".join(lines)


def run_config_record(config: RunConfig, loaded: LoadedSchedule, recipe: Recipe,
                      env: DistEnv, num_classes: int, precision: str,
                      resumed: dict[str, Any] | None) -> dict[str, Any]:
    """config.json: the resolved inputs and the environment, next to the results."""
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v)
                 for k, v in dataclasses.asdict(config).items()},
        "command": sys.argv, "schedule_source": str(config.phases_path),
        "schedule_format": loaded.source_format, "note": loaded.note,
        "schedule": loaded.schedule.to_dicts(), "recipe": recipe.to_dict(),
        "num_classes": num_classes, "world_size": env.world_size, "backend": env.backend,
        "device": str(env.device), "precision": precision,
        "global_batch_sizes": [p.batch_size * env.world_size for p in loaded.schedule.phases],
        "git_sha": git_sha(Path(__file__).resolve().parent), "environment": environment_info(),
        "resumed_from": resumed,
    }


# --- signals ------------------------------------------------------------------------------


class StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint and a clean exit at the next safe point.

    A second SIGINT aborts at once (KeyboardInterrupt) for the impatient, unless it comes
    within DUPLICATE_S of the first: Ctrl-C under torchrun reaches a worker twice, from the
    terminal and forwarded by torchrun.
    """

    DUPLICATE_S = 2.0

    def __init__(self) -> None:
        self.requested = False
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > self.DUPLICATE_S:
                raise KeyboardInterrupt
            return
        self.requested, self._first_at = True, time.monotonic()
        say(f"{signal.Signals(signum).name}: checkpointing at the next safe point "
            "(Ctrl-C again to abort without it)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@rank_zero_only
def say(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def run(config: RunConfig, data: DataSource | None = None) -> dict[str, Any]:
    """Train as the config says; returns the final metrics record (rank 0; {} elsewhere)."""
    loaded, recipe = load_inputs(config)
    schedule = loaded.schedule
    if data is None and config.data_dir is not None:
        data = ShardData(config.data_dir)
    if config.dry_run:
        classes = check_shards(schedule, data) if data is not None else None
        print(dry_run_text(config, loaded, recipe, classes))
        return {}
    if data is None:
        raise TrainError("--data is required (the directory holding train-<N>/ and val-<N>/)")
    classes = check_shards(schedule, data)
    from train.session import Session  # torch-heavy; imported after the cheap checks

    env = init_distributed(config.device)
    try:
        with StopFlag() as stop:
            session = Session(config, loaded, recipe, data, env, len(classes), stop)
            return session.train(targets_of(config, recipe))
    finally:
        shutdown(env)


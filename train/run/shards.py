"""Where a run's batches come from: the `DataSource` seam, shard checks, and the live loaders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from train.data.crops import TrainCrop
from train.errors import TrainError
from train.plan.config import Recipe, RunConfig
from train.plan.rebuilds import loader_changes, loader_settings
from train.plan.schedule import Schedule
from train.run.shard_checks import (
    ShardInfo,
    check_data_dir,
    check_global_batches,
    check_shard_info,
    read_shard_info,
)

if TYPE_CHECKING:  # annotations only: the dry run reads shards without importing torch
    import torch

    from train.data.augment import Augmentation
    from train.data.contract import TrainBatches, ValBatches
    from train.engine.dist import DistEnv
    from train.engine.loop import DeviceBatches


class DataSource(Protocol):
    """Loaders by shard directory name, and the step that puts their batches on the device."""

    def describe(self, dir_name: str) -> ShardInfo: ...

    def train_loader(
        self,
        dir_name: str,
        batch_size: int,
        crop: TrainCrop,
        *,
        rank: int,
        world_size: int,
        seed: int,
        workers: int,
        decode: str,
        device: str | None,
        augment: Augmentation | None,
    ) -> TrainBatches: ...

    def val_loader(
        self,
        dir_name: str,
        batch_size: int,
        crop_size: int,
        *,
        rank: int,
        world_size: int,
        workers: int,
        rect: bool,
        decode: str,
        device: str | None,
        resize_size: int | None = None,
    ) -> ValBatches: ...

    def prefetcher(
        self, loader: TrainBatches | ValBatches, device: torch.device, channels_last: bool
    ) -> DeviceBatches: ...


class ShardData:
    """Shard directories under `data_dir`, read by train.data.loaders."""

    def __init__(self, data_dir: Path) -> None:
        check_data_dir(data_dir)
        self.data_dir = Path(data_dir)

    def describe(self, dir_name: str) -> ShardInfo:
        return read_shard_info(self.data_dir / dir_name)

    def train_loader(
        self,
        dir_name,
        batch_size,
        crop,
        *,
        rank,
        world_size,
        seed,
        workers,
        decode,
        device,
        augment,
    ):
        from train.data.augment import Augmentation
        from train.data.loaders import TrainLoader

        augment = augment or Augmentation()
        return TrainLoader(
            self.data_dir / dir_name,
            batch_size,
            crop,
            rank=rank,
            world_size=world_size,
            seed=seed,
            workers=workers,
            decode=decode,
            device=device,
            **augment.loader_kwargs(),
        )

    def val_loader(
        self,
        dir_name,
        batch_size,
        crop_size,
        *,
        rank,
        world_size,
        workers,
        rect,
        decode,
        device,
        resize_size=None,
    ):
        from train.data.loaders import ValLoader

        return ValLoader(
            self.data_dir / dir_name,
            batch_size,
            crop_size,
            rank=rank,
            world_size=world_size,
            workers=workers,
            rect=rect,
            decode=decode,
            device=device,
            resize_size=resize_size,
        )

    def prefetcher(self, loader, device, channels_last):
        from train.data.prefetch import DevicePrefetcher

        return DevicePrefetcher(loader, device, channels_last=channels_last)


def check_shards(schedule: Schedule, data: DataSource, world_size: int = 1) -> list[str]:
    """Every shard directory the schedule reads exists, is complete, holds the split and
    prep_size its name says, labels inside its classes, the same classes as the others, and
    enough images for each phase's global batch (train.run.shard_checks).

    Returns the class list. Runs before anything is started so a missing `val-320/` fails in
    a second with the phase that needs it, not after hours of training.
    """
    from formats import DatasetError

    classes: list[str] | None = None
    first_dir = ""
    num_train_images: dict[str, int] = {}
    seen: set[str] = set()
    for index, phase in enumerate(schedule.phases):
        for split, dir_name, prep_size in (
            ("train", phase.train_dir_name, phase.prep_size),
            ("val", phase.val_dir_name, phase.val_prep_size),
        ):
            if dir_name in seen:
                continue
            seen.add(dir_name)
            try:
                info = data.describe(dir_name)
            except (DatasetError, OSError, ValueError) as exc:
                raise TrainError(
                    f"phase {index} needs {split} shards {dir_name}/ (prep_size {prep_size}): {exc}"
                ) from None
            check_shard_info(info, dir_name, split, prep_size)
            if split == "train":
                num_train_images[dir_name] = info.num_images
            if classes is None:
                classes, first_dir = info.classes, dir_name
            elif info.classes != classes:
                raise TrainError(
                    f"{dir_name}/ has {len(info.classes)} classes that differ "
                    f"from {first_dir}/'s {len(classes)}; build both from one "
                    "source"
                )
    check_global_batches(schedule, num_train_images, world_size)
    assert classes is not None
    return classes


def train_augmentation(recipe: Recipe) -> Augmentation:
    """The recipe's augmentation keys, as the train loaders take them."""
    from train.data.augment import Augmentation

    return Augmentation(
        auto_augment=recipe.auto_augment,
        color_jitter=recipe.color_jitter,
        random_erasing=recipe.random_erasing,
        repeat_aug=recipe.repeat_aug,
    )


class LiveLoaders:
    """The loaders of the current epoch; `for_epoch` applies that epoch's LoaderChanges."""

    def __init__(
        self,
        data: DataSource,
        env: DistEnv,
        config: RunConfig,
        schedule: Schedule,
        recipe: Recipe | None = None,
    ) -> None:
        self.data, self.env, self.config, self.schedule = data, env, config, schedule
        self.augment = train_augmentation(recipe) if recipe is not None else None
        self.train: TrainBatches | None = None
        self.val: ValBatches | None = None

    def for_epoch(self, epoch: int) -> tuple[TrainBatches, list[str]]:
        """The train loader for `epoch`, and imagenet18-style event lines for what changed.

        The first call in a process builds both loaders (fresh), as after a resume."""
        changes = loader_changes(self.schedule, epoch, fresh=self.train is None)
        settings = loader_settings(self.schedule, epoch)
        env, cfg = self.env, self.config
        device = str(env.device) if cfg.decode == "gpu" else None
        crop = TrainCrop(settings.crop_size, settings.min_scale)
        events = []
        if changes.rebuild_train:
            self._close_train()
            self.train = self.data.train_loader(
                settings.train_dir_name,
                settings.batch_size,
                crop,
                rank=env.rank,
                world_size=env.world_size,
                seed=cfg.seed,
                workers=cfg.workers,
                decode=cfg.decode,
                device=device,
                augment=self.augment,
            )
            events.append(
                f"Dataset changed.\nImage size: {settings.crop_size}\nBatch size: "
                f"{settings.batch_size}\nTrain Directory: {settings.train_dir_name}"
                f"\nValidation Directory: {settings.val_dir_name}"
            )
        elif {"crop_size", "min_scale"} & set(changes.in_place):
            self.train.set_crop(crop)
            events.append(f"Crop changed: {settings.crop_size} px, min_scale {settings.min_scale}")
        if changes.rebuild_val:
            self._close_val()
            self.val = self.data.val_loader(
                settings.val_dir_name,
                settings.batch_size,
                settings.val_crop_size,
                rank=env.rank,
                world_size=env.world_size,
                workers=cfg.workers,
                rect=settings.rect_val,
                decode=cfg.decode,
                device=device,
                resize_size=settings.val_resize_size,
            )
        elif {"val_crop_size", "val_resize_size"} & set(changes.in_place):
            self.val.set_crop_size(settings.val_crop_size, settings.val_resize_size)
        return self.train, events

    def _close_train(self) -> None:
        if self.train is not None:
            self.train.close()
            self.train = None

    def _close_val(self) -> None:
        if self.val is not None:
            self.val.close()
            self.val = None

    def close(self) -> None:
        self._close_train()
        self._close_val()

"""A stand-in for train.data.loaders / train.data.prefetch over tiny in-memory uint8 images,
for trainer tests.

It implements the loader contract the trainer codes against (train.data.loaders.TrainBatches /
ValBatches: set_epoch with start_batch, set_crop, close, equal len on every rank, possibly
empty val batches; train.engine.loop.DeviceBatches' data_wait_seconds), records every loader call in
`StandInData.calls` (the rebuild test compares them with the dry-run table), and one
property the DDP test needs: rank r's batch b of world size W is rows [r*B, (r+1)*B) of the
global batch b that a single process with batch W*B gets. Images are learnable (each class
has its own mean colour), so a few steps beat chance.

Run as a script it trains through `train.run.main.run` on this data (used by the resume and DDP
tests, which need a real process to kill or torchrun to launch):

    python tests/train/standin.py --phases P --out DIR [--resume auto] [--delay 0.2] ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from formats import DatasetError  # noqa: E402
from train.data.crops import TrainCrop  # noqa: E402
from train.run.shard_checks import ShardInfo  # noqa: E402

NUM_CLASSES = 3
STORED_SIZE = 40  # side of the stored images; crops are resized from them


def make_images(num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % NUM_CLASSES
    colours = torch.tensor([[200, 60, 60], [60, 200, 60], [60, 60, 200]], dtype=torch.float32)
    noise = torch.randn(num_images, 3, STORED_SIZE, STORED_SIZE, generator=generator) * 40
    images = (colours[labels].view(-1, 3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    return images, labels


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


class StandInTrainLoader:
    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        crop: TrainCrop,
        *,
        rank: int,
        world_size: int,
        seed: int,
        delay: float = 0.0,
        calls=None,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.crop, self.delay = crop, delay
        self.epoch, self.start_batch = 0, 0
        self.num_images, self.num_classes = len(images), NUM_CLASSES
        self.calls = calls if calls is not None else []

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.calls.append(("set_epoch", epoch, start_batch))
        self.epoch, self.start_batch = epoch, start_batch

    def set_crop(self, crop: TrainCrop) -> None:
        self.calls.append(("set_crop", crop.crop_size, crop.min_scale))
        self.crop = crop

    def close(self) -> None:
        self.calls.append(("close_train",))

    def __len__(self) -> int:
        return self.num_images // (self.batch_size * self.world_size)

    def __iter__(self):
        order = torch.randperm(
            self.num_images, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        )
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            rows = order[b * global_batch : (b + 1) * global_batch]
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + b)
            flips = torch.rand(global_batch, generator=generator) < 0.5
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            images = resize(self.images[rows[mine]], self.crop.crop_size)
            images[flips[mine]] = images[flips[mine]].flip(3)
            if self.delay:
                time.sleep(self.delay)
            yield images, self.labels[rows[mine]]


class StandInValLoader:
    """Rank r gets images r, r+W, ...; batches padded with EMPTY ones to equal counts."""

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        crop_size: int,
        *,
        rank: int,
        world_size: int,
        calls=None,
    ) -> None:
        self.images, self.labels, self.crop_size = images, labels, crop_size
        self.calls = calls if calls is not None else []
        self.indices = list(range(rank, len(images), world_size))
        per_rank = -(-len(images) // world_size)
        self.num_batches = -(-per_rank // batch_size)
        self.batch_size = batch_size

    def set_crop_size(self, crop_size: int, resize_size: int | None = None) -> None:
        self.calls.append(("set_crop_size", crop_size))
        self.crop_size = crop_size

    def close(self) -> None:
        self.calls.append(("close_val",))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for b in range(self.num_batches):
            rows = torch.tensor(
                self.indices[b * self.batch_size : (b + 1) * self.batch_size], dtype=torch.long
            )
            if len(rows) == 0:  # padding batch: this rank has run out of images
                size = self.crop_size
                yield torch.empty((0, 3, size, size), dtype=torch.uint8), self.labels[rows]
                continue
            yield resize(self.images[rows], self.crop_size), self.labels[rows]


class StandInPrefetcher:
    def __init__(self, loader, device, channels_last: bool = True) -> None:
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.data_wait_seconds = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            finally:
                self.data_wait_seconds += time.perf_counter() - started
            x = (images.float() / 255 - 0.5) / 0.25
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x.to(self.device), labels.to(self.device)


class StandInData:
    """A DataSource (train.run.shards) with shards named train-<N>/val-<N> for N in `prep_sizes`."""

    def __init__(
        self, num_train: int = 48, num_val: int = 18, prep_sizes=(160,), delay: float = 0.0
    ) -> None:
        self.train = make_images(num_train, seed=1)
        self.val = make_images(num_val, seed=2)
        self.dir_names = {f"{split}-{n}" for split in ("train", "val") for n in prep_sizes}
        self.delay = delay
        self.calls: list[tuple] = []  # every loader call, in order

    def describe(self, dir_name: str) -> ShardInfo:
        if dir_name not in self.dir_names:
            raise DatasetError(f"{dir_name}: no such dataset directory")
        split, prep_size = dir_name.split("-")
        return ShardInfo(
            [f"n{i:08d}" for i in range(NUM_CLASSES)],
            split,
            int(prep_size),
            len((self.train if split == "train" else self.val)[0]),
        )

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
        augment=None,
    ):
        self.calls.append(("train_loader", dir_name, batch_size, crop.crop_size, crop.min_scale))
        return StandInTrainLoader(
            *self.train,
            batch_size,
            crop,
            rank=rank,
            world_size=world_size,
            seed=seed,
            delay=self.delay,
            calls=self.calls,
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
        device=None,
        resize_size=None,  # the stand-in resizes whole images: no center crop to place
    ):
        self.calls.append(("val_loader", dir_name, batch_size, crop_size, rect))
        return StandInValLoader(
            *self.val, batch_size, crop_size, rank=rank, world_size=world_size, calls=self.calls
        )

    def prefetcher(self, loader, device, channels_last):
        return StandInPrefetcher(loader, device, channels_last)


def quick_config(**fields):
    """A RunConfig for in-process runs on the stand-in: CPU, one thread, no progress bar or
    TensorBoard, unless `fields` (RunConfig's, phases_path among them) say otherwise."""
    from train.plan.config import RunConfig

    return RunConfig(
        **{
            "device": "cpu",
            "progress": False,
            "tensorboard": False,
            "log_every": 2,
            "threads": 1,
            **fields,
        }
    )


def main(argv: list[str] | None = None) -> None:
    from train.plan.config import RunConfig
    from train.run.main import run

    parser = argparse.ArgumentParser()
    parser.add_argument("--phases", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--checkpoint-every-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=48)
    parser.add_argument("--num-val", type=int, default=18)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    config = RunConfig(
        args.phases,
        out_dir=args.out,
        device=args.device,
        resume=args.resume,
        checkpoint_every_steps=args.checkpoint_every_steps,
        threads=args.threads,
        progress=False,
        tensorboard=False,
        log_every=1,
    )
    run(config, StandInData(args.num_train, args.num_val, delay=args.delay))


if __name__ == "__main__":
    main()

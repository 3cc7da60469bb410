"""Stand-in runs for the elastic-resume test (tests/train/run/test_elastic.py), one process per
rank: tests/train/standin.py's data with the two things that test needs.

- Rank r's micro-batch b of world size W holds permutation positions (b * W + r) * B ... (as
  train.data.samplers places them) and each image's flip is drawn per position, not per
  micro-batch, so the same step sees the same images on any split (the real loader draws
  its crops and flips per position too).
- `--record DIR`: every micro-batch a rank takes is a JSON line (epoch, micro-batch, rank,
  world size, batch size, record indices) in DIR/rank<r>-<pid>.jsonl;
  `--stop-after N`: rank 0 sends itself SIGTERM as it hands out its N-th micro-batch, so the
  run checkpoints and stops after that step (train.run.signals), at the same step every time.

    python tests/train/run/elastic_standin.py --phases P --out DIR [--resume auto] ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.train.standin import StandInData, StandInTrainLoader, resize  # noqa: E402


class PositionalTrainLoader(StandInTrainLoader):
    def __init__(self, *args, record: Path | None, stop, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record, self.stop = record, stop

    def __iter__(self):
        order = torch.randperm(
            self.num_images, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        flips = torch.rand(self.num_images, generator=generator) < 0.5  # per position
        size = self.batch_size
        for b in range(self.start_batch, len(self)):
            first = (b * self.world_size + self.rank) * size
            rows = order[first : first + size]
            images = resize(self.images[rows], self.crop.crop_size)
            flip = flips[first : first + size]
            images[flip] = images[flip].flip(3)
            self.write(b, rows)
            self.stop()
            yield images, self.labels[rows]

    def write(self, batch: int, rows: torch.Tensor) -> None:
        if self.record is None:
            return
        line = {
            "epoch": self.epoch,
            "batch": batch,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "indices": rows.tolist(),
        }
        path = self.record / f"rank{self.rank}-{os.getpid()}.jsonl"
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


class ElasticData(StandInData):
    def __init__(self, *args, record: Path | None = None, stop_after: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record, self.stop_after, self.handed_out = record, stop_after, 0

    def count(self, rank: int) -> None:
        """Rank 0's micro-batches so far; SIGTERM at the `stop_after`-th."""
        if rank != 0:
            return
        self.handed_out += 1
        if self.handed_out == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    def train_loader(self, dir_name, batch_size, crop, *, rank, world_size, seed, **_) -> object:
        self.calls.append(("train_loader", dir_name, batch_size, crop.crop_size, crop.min_scale))
        return PositionalTrainLoader(
            *self.train,
            batch_size,
            crop,
            rank=rank,
            world_size=world_size,
            seed=seed,
            calls=self.calls,
            record=self.record,
            stop=lambda: self.count(rank),
        )


def main(argv: list[str] | None = None) -> None:
    from train.errors import Interrupted
    from train.plan.config import RunConfig
    from train.run.main import run

    parser = argparse.ArgumentParser()
    parser.add_argument("--phases", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--global-batch", default=None)
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=17)
    args = parser.parse_args(argv)
    config = RunConfig(
        args.phases,
        out_dir=args.out,
        device="cpu",
        resume=args.resume,
        global_batch=args.global_batch,
        threads=1,
        progress=False,
        tensorboard=False,
        log_every=1,
    )
    data = ElasticData(args.num_train, args.num_val, record=args.record, stop_after=args.stop_after)
    try:
        run(config, data)
    except Interrupted as exc:  # the stop asked for: checkpointed, as `train run` exits 130
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

"""Minimal end-to-end threaded training loader (prototype for issue 10, bench only).

Worker threads in the consumer's process, each making whole batches (worker w makes batches
w, w + W, ...): per image a DCT-scaled libjpeg-turbo decode (ctypes, GIL released) into the
thread's scratch buffer, crop + antialiased resize straight into the batch's slot of a reused
NHWC uint8 ring (prototypes/batch_ring.py), then one vectorised flip per batch. Boxes, flips and
the order come from our public train API (TrainBatchSampler + TrainPlan), so a batch depends on
(seed, epoch, rank, world size, batch index) exactly as in train/data.py, whatever W is.

Yields (images, labels): images uint8 (N, 3, H, W) as a channels_last view of the NHWC slot
(`layout="nchw-view"`, FFCV's default), the NHWC tensor itself (`"nhwc"`), or a contiguous
NCHW copy (`"nchw"`). A batch is valid until the next one is taken.
"""
from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import torch

from formats.dataset import RecordDataset
from prototypes.batch_ring import BatchRing
from prototypes.crop_decode import CropDecoder, keep_freed_memory
from train.augment import TrainCrop
from train.samplers import TrainPlan
from train.samplers import TrainBatchSampler

LAYOUTS = ("nchw-view", "nhwc", "nchw")


class ThreadLoader:
    def __init__(self, dataset_dir: Path, batch_size: int, crop: TrainCrop, *, workers: int = 2, seed: int = 0,
                 resize: str = "pil", layout: str = "nchw-view", slots_per_worker: int = 2, pin: bool = False,
                 flags: int = 0, tune_process: bool = True):
        if workers < 1 or layout not in LAYOUTS:
            raise ValueError(f"need workers >= 1 and layout in {LAYOUTS}")
        self.records = RecordDataset(dataset_dir)
        self.heights, self.widths = self.records.heights, self.records.widths
        self.max_pixels = int((self.heights.astype(np.int64) * self.widths).max())
        self.sampler = TrainBatchSampler(len(self.records), batch_size, seed=seed)
        self.crop, self.seed, self.workers, self.resize, self.layout, self.flags = crop, seed, workers, resize, layout, flags
        self.ring = BatchRing(workers * slots_per_worker, batch_size, crop.crop_size, crop.crop_size, pin=pin)
        self.threads: list[threading.Thread] = []
        if tune_process:  # both process-wide: fine for a bench process, a decision for train/
            if resize == "torch":  # per-image torch ops must not fan out to the intra-op pool
                torch.set_num_threads(1)
            keep_freed_memory()

    def _plans(self):
        """Endless plans, epoch after epoch (the next epoch is known here, so no drain between)."""
        for epoch in itertools.count():
            self.sampler.set_epoch(epoch)
            for batch in self.sampler:
                yield TrainPlan(batch, self.crop, self.seed)

    def __iter__(self):
        plans = self._plans()
        plan_lock = threading.Lock()
        # Plans are handed out in order under a lock, batch number = position in the stream.
        counter = itertools.count()

        def next_plan():
            with plan_lock:
                return next(counter), next(plans)

        self.threads = [threading.Thread(target=self._work, args=(next_plan,), daemon=True)
                        for _ in range(self.workers)]
        for thread in self.threads:
            thread.start()
        for batch in itertools.count():
            images, labels = self.ring.take(batch)
            if self.layout == "nhwc":
                yield images, labels
            elif self.layout == "nchw-view":
                yield images.permute(0, 3, 1, 2), labels
            else:
                yield images.permute(0, 3, 1, 2).contiguous(), labels

    def _work(self, next_plan) -> None:
        decoder = CropDecoder(self.max_pixels, self.resize, self.flags)
        records, heights, widths = self.records, self.heights, self.widths
        while True:
            number, plan = next_plan()
            slot = self.ring.claim(number)
            if slot is None:
                return
            try:
                indices = plan.batch.indices
                boxes, flips = plan.boxes_and_flips(heights, widths)
                slots = slot.numpy()
                for position, index in enumerate(indices.tolist()):
                    decoder.into(slots[position], records.view(index), int(heights[index]), int(widths[index]),
                                 boxes[position], flips[position])
                self.ring.publish(number, len(indices), torch.from_numpy(records.labels[indices]))
            except Exception as err:  # handed to the consumer, raised there
                self.ring.publish(number, 0, None, err)

    def close(self) -> None:
        self.ring.close()

"""The decode-only floor of a training crop: libjpeg-turbo decoding every stored record at the DCT
scale our loader picks for that crop (train.augment.dct_scale_for_box of a RandomResizedCrop box
drawn as the loader draws it), nothing else: no crop, resize, flip or copy, one thread.

Two bindings: "ctypes" (bench/prototypes/tjdecode.py: one handle, header once, into a reused
buffer: libjpeg-turbo's own cost) and "pyturbojpeg" (PyTurboJPEG 1.8.3's decode as
formats.jpeg calls it: a handle created per call and a new array per image).
"""
from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import numpy as np

from formats import jpeg
from prototypes import tjdecode
from train.augment import TrainCrop, dct_scale_for_box, scaled_image_size


def decode_jobs(records: list[bytes], heights, widths, crop_size: int, seed: int = 0) -> list[tuple]:
    """(data, scaled_height, scaled_width, scale) per record, for one random box each."""
    crop, rng, jobs = TrainCrop(crop_size), random.Random(seed), []
    for data, height, width in zip(records, heights, widths):
        box = crop.box(int(height), int(width), rng)
        scale = dct_scale_for_box(box[2], box[3], crop_size, crop_size)
        jobs.append((data, *scaled_image_size(int(height), int(width), *scale), scale))
    return jobs


def scale_shares(jobs: list[tuple]) -> dict[str, float]:
    counts = Counter(f"{num}/{den}" for *_, (num, den) in jobs)
    return {scale: count / len(jobs) for scale, count in sorted(counts.items())}


def time_floor(jobs: list[tuple], num_images: int, binding: str = "ctypes") -> dict:
    """Decode `num_images` (whole passes over jobs, at least one) and time it."""
    buffer = np.empty(max(h * w for _, h, w, _ in jobs) * 3, dtype=np.uint8)
    out_address = buffer.ctypes.data
    decompressor = tjdecode.for_thread()
    turbo = jpeg.turbo()
    addresses = [tjdecode.address_of(data) for data, *_ in jobs]
    passes = max(1, -(-num_images // len(jobs)))
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(passes):
        if binding == "ctypes":
            for (address, size), (_, height, width, _) in zip(addresses, jobs):
                decompressor.decode_into(address, size, out_address, width, width * 3, height)
        else:
            for data, _, _, scale in jobs:
                turbo.decode(data, pixel_format=jpeg.TJPF_RGB, scaling_factor=scale)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"images": passes * len(jobs), "seconds": wall, "cpu_seconds": cpu, "batches": 0, "workers": 1}


def floor_jobs(dataset_dir: Path, crop_size: int) -> list[tuple]:
    from formats.dataset import RecordDataset
    from formats.lmdb_store import release_env

    records = RecordDataset(dataset_dir)
    datas = [bytes(records.view(index)) for index in range(len(records))]
    jobs = decode_jobs(datas, records.heights, records.widths, crop_size)
    records.close()
    release_env(dataset_dir)  # a process forked later must not inherit an open LMDB environment
    return jobs

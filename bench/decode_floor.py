"""The decode-only floor of a training crop: libjpeg-turbo decoding every stored record at the DCT
scale our loader picks for that crop (train.data.crops.dct_scale_for_box of a RandomResizedCrop box
drawn as the loader draws it), nothing else: no resize, flip or copy, one thread.

Three kinds (train.data.decode.decode_only for the first two: libjpeg's own API in C, one decoder
reused, rows into a reused buffer; the loader's own decode step):
  "full":        the whole image at that DCT scale (the issue's floor definition);
  "region":      only the crop's rows and columns, as the loader decodes them (so the loader
                 can beat the "full" floor: it skips the rows below the box and the columns
                 outside it);
  "pyturbojpeg": PyTurboJPEG 1.8.3's decode as formats.jpeg calls it (a handle per call, a new
                 array per image): the full decode with Python's overhead around it.
Each one thread by default; `threads=N` times N threads at once (the loader's concurrency: on
a machine whose cores share caches or a physical core, N threads get less per core than one).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from formats import jpeg
from train.data.crops import CROP_DRAWS, TrainCrop, dct_scale_for_box
from train.data.decode import decode_only
from train.data.samplers import sample_uniforms

KINDS = ("full", "region", "pyturbojpeg")


class FloorJobs:
    """Every record of a store with one random crop box each, as the loader would draw it."""

    def __init__(self, records: list[bytes], heights, widths, crop_size: int, seed: int = 0):
        self.records, self.crop_size = records, crop_size
        self.heights, self.widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
        uniforms = sample_uniforms(seed, 0, 0, len(records), CROP_DRAWS)
        self.boxes = TrainCrop(crop_size).boxes(self.heights, self.widths, uniforms)
        self.scales = [
            dct_scale_for_box(int(b[2]), int(b[3]), crop_size, crop_size) for b in self.boxes
        ]

    def __len__(self) -> int:
        return len(self.records)


def scale_shares(jobs: FloorJobs) -> dict[str, float]:
    counts = Counter(f"{num}/{den}" for num, den in jobs.scales)
    return {scale: count / len(jobs) for scale, count in sorted(counts.items())}


def kinds_available() -> tuple[str, ...]:
    """KINDS this process can time: "pyturbojpeg" needs libturbojpeg."""
    return tuple(kind for kind in KINDS if kind != "pyturbojpeg" or jpeg.turbo() is not None)


def _decode_passes(jobs: FloorJobs, part: slice, passes: int, kind: str) -> None:
    records, scales = jobs.records[part], jobs.scales[part]
    turbo = jpeg.turbo()
    for _ in range(passes):
        if kind == "pyturbojpeg":
            for data, scale in zip(records, scales):
                turbo.decode(data, pixel_format=jpeg.TJPF_RGB, scaling_factor=scale)
            continue
        failure = decode_only(
            records,
            jobs.heights[part],
            jobs.widths[part],
            jobs.boxes[part],
            jobs.crop_size,
            jobs.crop_size,
            region=kind == "region",
        )
        if failure is not None:
            raise RuntimeError(f"record {failure[0]}: {failure[1]}")


def time_floor(jobs: FloorJobs, num_images: int, kind: str = "full", threads: int = 1) -> dict:
    """Decode `num_images` (whole passes over jobs, at least one) and time it. `threads` > 1:
    that many threads at once, each over its share of the records (the decode releases the
    GIL), so that per core = img/s / threads is the floor at the loader's own concurrency."""
    if kind not in kinds_available():
        raise ValueError(f"kind must be one of {kinds_available()} here, got {kind!r}")
    if not 1 <= threads <= len(jobs):
        raise ValueError(f"threads must be in 1..{len(jobs)}, got {threads}")
    passes = max(1, -(-num_images // len(jobs)))
    parts = [
        slice(len(jobs) * i // threads, len(jobs) * (i + 1) // threads) for i in range(threads)
    ]
    started, cpu_started = time.perf_counter(), time.process_time()
    if threads == 1:
        _decode_passes(jobs, parts[0], passes, kind)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for done in [pool.submit(_decode_passes, jobs, part, passes, kind) for part in parts]:
                done.result()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "images": passes * len(jobs),
        "seconds": wall,
        "cpu_seconds": cpu,
        "batches": 0,
        "workers": threads,
    }


def floor_jobs(dataset_dir: Path, crop_size: int) -> FloorJobs:
    from formats.dataset import RecordDataset
    from formats.lmdb_store import release_env

    records = RecordDataset(dataset_dir)
    datas = [bytes(records.view(index)) for index in range(len(records))]
    jobs = FloorJobs(datas, records.heights, records.widths, crop_size)
    records.close()
    release_env(dataset_dir)  # a process forked later must not inherit an open LMDB environment
    return jobs

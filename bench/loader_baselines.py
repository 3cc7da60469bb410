"""What bench/loader.py measures ours against: the inputs the baselines read (PIL-resized class
folders, our shards, WebDataset tars), cached under the fixture, and the baseline loaders the way
their users write them (per-sample PIL decode, torchvision transforms, default collate).

Every loader here is one endless iterator (epochs back to back: a RandomSampler drawing several
permutations, or resampled shards), so no loader pays the tiny fixture's epoch-boundary drain,
which ImageNet's 10,000-batch epochs never notice. Nothing runs at import time.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms
from torchvision.datasets import ImageFolder

from formats import DatasetError
from formats.dataset import RecordDataset
from formats.lmdb_store import release_env
from formats.manifest import load_records, read_manifest
from formats.record import encode_key

ENDLESS = 10**9  # samples drawn by a baseline's sampler: permutation after permutation
FOLDER_QUALITY = 90
WDS_SHARDS = 8  # whole shards per worker; 250 images each for a 2,000-image fixture
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- cached inputs


def cache_dir_for(fixture_dir: Path) -> Path:
    """<fixture>/loader-bench, emptied whenever the fixture's parameters change."""
    stamp = hashlib.sha256(
        json.dumps(
            json.loads((fixture_dir / "fixture.json").read_text())["params"], sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    cache = fixture_dir / "loader-bench"
    stamp_path = cache / "fixture-stamp"
    if not stamp_path.is_file() or stamp_path.read_text() != stamp:
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        stamp_path.write_text(stamp)
    return cache


def _resize_one(job: tuple[Path, list[Path], tuple[int, ...]]) -> None:
    """imagenet18's copies: full decode, shorter side to each size (never enlarged), JPEG q90."""
    src, outs, sizes = job
    with Image.open(src) as opened:
        image = opened.convert("RGB")
    for out, size in zip(outs, sizes):
        ratio = size / min(image.size)
        resized = (
            image
            if ratio >= 1
            else image.resize(
                (max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
                Image.Resampling.BILINEAR,
            )
        )
        resized.save(out, "JPEG", quality=FOLDER_QUALITY)


def resized_folders(
    fixture_dir: Path, cache: Path, sizes: tuple[int, ...], workers: int
) -> dict[int, Path]:
    """{size: root} of ImageFolder trees `<root>/<wnid>/*.JPEG`, made once with PIL."""
    roots = {size: cache / f"folder-{size}" for size in sizes}
    todo = [size for size in sizes if not (roots[size] / "done").is_file()]
    if todo:
        source = fixture_dir / "folders" / "train"
        files = sorted(source.glob("*/*.JPEG"))
        for size in todo:
            shutil.rmtree(roots[size], ignore_errors=True)
            for wnid in {path.parent.name for path in files}:
                (roots[size] / wnid).mkdir(parents=True)
        jobs = [
            (path, [roots[s] / path.parent.name / path.name for s in todo], tuple(todo))
            for path in files
        ]
        with Pool(max(1, workers)) as pool:
            pool.map(_resize_one, jobs, chunksize=16)
        for size in todo:
            (roots[size] / "done").write_text(str(len(files)))
    return roots


def stored_records(dataset_dir: Path) -> list[tuple[bytes, int]]:
    """Every (JPEG bytes, label) of a dataset, read in this process, which then lets go of the
    store: a forked baseline worker cannot open an LMDB environment its parent holds open."""
    records = RecordDataset(dataset_dir)
    out = [
        (bytes(records.view(index)), int(records.labels[index])) for index in range(len(records))
    ]
    records.close()
    release_env(dataset_dir)
    return out


def _opens(dataset_dir: Path) -> bool:
    try:
        RecordDataset(dataset_dir).close()
        return True
    except (DatasetError, OSError, ValueError):
        return False


def our_shards(fixture_dir: Path, cache: Path, prep_sizes: tuple[int, ...]) -> dict[str, Path]:
    """{store: out dir} holding train-<size>/ for each size, built by `prep build-*` once."""
    outs = {}
    for store in ("lmdb", "msgpack"):
        out = cache / store
        if not all(_opens(out / f"train-{size}") for size in prep_sizes):
            args = [
                sys.executable,
                "-m",
                "prep.cli",
                f"build-{store}",
                "--src",
                str(fixture_dir / "archives"),
                "--out",
                str(out),
                "--overwrite",
                "-q",
            ] + [a for s in prep_sizes for a in ("--size", str(s))]
            done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{' '.join(args[2:])} failed:\n{done.stderr}")
        outs[store] = out
    return outs


def wds_tars(dataset_dir: Path, cache: Path) -> list[str]:
    """WebDataset shards of the stored sz/160 JPEGs (the same bytes ours reads), samples in a
    seeded random order as a WebDataset writer leaves them: `<key>.jpg` + `<key>.cls`."""
    out = cache / f"wds-{dataset_dir.name}"
    paths = [out / f"shard-{shard:04d}.tar" for shard in range(WDS_SHARDS)]
    if not (out / "done").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        records = stored_records(dataset_dir)
        order = list(range(len(records)))
        random.Random(0).shuffle(order)
        for shard, path in enumerate(paths):
            with tarfile.open(path, "w") as tar:
                for index in order[shard::WDS_SHARDS]:
                    data, label = records[index]
                    for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                        info = tarfile.TarInfo(f"{index:07d}.{ext}")
                        info.size, info.mtime = len(payload), 0
                        tar.addfile(info, io.BytesIO(payload))
        (out / "done").write_text(str(len(paths)))
    return [str(path) for path in paths]


# --------------------------------------------------------------------------- baseline loaders


def train_transform(crop_size: int):
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(crop_size),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )


def val_transform(crop_size: int, resize: int):
    return transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(crop_size), transforms.PILToTensor()]
    )


def _dataloader(dataset, batch_size: int, workers: int) -> DataLoader:
    """What a user writes (default collate, workers), with an endless sampler."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, num_samples=ENDLESS),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )


def imagefolder_loader(root: Path, transform, batch_size: int, workers: int) -> DataLoader:
    return _dataloader(ImageFolder(str(root), transform=transform), batch_size, workers)


class LmdbPil(Dataset):
    """Efficient-PyTorch's ImageFolderLMDB, over our LMDB store: env opened (lazily, in the
    worker) readonly and lock-free, one txn.get per sample, PIL.Image.open(BytesIO(bytes))."""

    def __init__(self, dataset_dir: Path, transform):
        self.dataset_dir, self.transform, self.env = Path(dataset_dir), transform, None
        manifest = read_manifest(self.dataset_dir)
        self.labels = load_records(self.dataset_dir, manifest)["label"].tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.env is None:
            import lmdb

            self.env = lmdb.open(
                str(self.dataset_dir),
                subdir=True,
                readonly=True,
                lock=False,
                readahead=False,
                meminit=False,
            )
        with self.env.begin(write=False) as txn:
            data = txn.get(encode_key(index))
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return self.transform(image), self.labels[index]


def lmdb_pil_loader(dataset_dir: Path, transform, batch_size: int, workers: int) -> DataLoader:
    return _dataloader(LmdbPil(dataset_dir, transform), batch_size, workers)


def webdataset_loader(urls: list[str], transform, batch_size: int, workers: int):
    """The WebDataset README's training recipe, resampled shards (endless), batched in workers
    and handed over by a plain DataLoader(batch_size=None) (what wds.WebLoader wraps)."""
    import webdataset as wds

    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, lambda label: label)
        .batched(batch_size)
    )
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


# --------------------------------------------------------------------------- the floor


def decode_floor(dataset_dir: Path, seconds: float) -> dict:
    """libjpeg-turbo decode of every stored JPEG, one process, no crop/resize/copy: whole
    passes until `seconds` have gone by."""
    from formats import jpeg

    datas = [data for data, _ in stored_records(dataset_dir)]
    turbo = jpeg.turbo()
    for data in datas[:32]:  # warm-up
        turbo.decode(data, pixel_format=jpeg.TJPF_RGB)
    images, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        for data in datas:
            turbo.decode(data, pixel_format=jpeg.TJPF_RGB)
        images += len(datas)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"images": images, "seconds": wall, "cpu_seconds": cpu, "batches": 0, "workers": 1}

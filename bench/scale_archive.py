"""ImageNet's exact archive layout and counts, filled with small real-photo crops: the data of
bench/scale.py.

`ILSVRC2012_img_train.tar` holds 1,000 per-class tars, 1,281,167 members in all (1,300 in most
classes, fewer in 110, as in ImageNet, whose smallest class has 732), `ILSVRC2012_img_val.tar`
50,000 flat members in shuffled class order (50 per class), and `ILSVRC2012_devkit_t12.tar.gz` the
meta.mat and ground truth that map them, with ILSVRC2012_IDs that are not in sorted-wnid order.
Images are crops of bench/fixture.py's source photos at half its ImageNet-like sizes (median 250x188
px, JPEG q60-80 4:2:0, ~7 KB): small enough to fit a laptop disk, real enough to decode like photos.
Like ImageNet, 22 train JPEGs are CMYK and one is a PNG named .JPEG; 1.5% are grayscale (the bench
fixture's share). `--scale` multiplies every count (each class keeps at least one train image).
Every byte depends only on (scale, seed).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
from multiprocessing import get_context
from pathlib import Path

import fixture  # bench/fixture.py: the source photos and ImageNet-like geometry
import numpy as np
from PIL import Image

from prep.sample.archives import class_words, devkit_ids, meta_mat_bytes, synset_rows, train_numbers

NUM_CLASSES = 1000
TRAIN_IMAGES = 1_281_167
MAX_PER_CLASS, MIN_PER_CLASS = 1300, 732
VAL_PER_CLASS = 50
NUM_CMYK = 22
SIZE_FACTOR = 0.5  # of fixture.draw_output_size's ImageNet geometry
SOURCE_REDUCE = 2  # sources are halved first, so crops keep detail and render fast
QUALITY = (60, 81)
FIXED_MTIME = 1_335_830_400
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"


def class_counts(scale: float, seed: int) -> list[int]:
    """Train images per class: 1,300 for most, fewer (down to 732) for some, summing to
    1,281,167 at scale 1; scaled counts keep at least one image per class."""
    rng = np.random.default_rng([seed, 10])
    deficit = NUM_CLASSES * MAX_PER_CLASS - TRAIN_IMAGES
    short = rng.choice(NUM_CLASSES, size=110, replace=False)
    weights = rng.random(len(short))
    cuts = np.minimum(
        np.floor(weights / weights.sum() * deficit).astype(int), MAX_PER_CLASS - MIN_PER_CLASS
    )
    cuts[np.argmin(cuts)] += deficit - cuts.sum()  # exact total
    counts = np.full(NUM_CLASSES, MAX_PER_CLASS)
    counts[short] -= cuts
    assert counts.sum() == TRAIN_IMAGES and counts.min() >= MIN_PER_CLASS
    return [max(1, int(round(c * scale))) for c in counts]


def val_labels(scale: float, seed: int) -> list[int]:
    labels = np.random.default_rng([seed, 11]).permutation(
        np.repeat(np.arange(NUM_CLASSES), VAL_PER_CLASS)
    )
    return [int(c) for c in labels[: max(1, int(round(len(labels) * scale)))]]


def image_modes(num_images: int, seed: int, split: str) -> dict[int, str]:
    """Index -> "CMYK", "PNG" or "L" for the odd images of a split; the rest are RGB."""
    rng = np.random.default_rng([seed, 12, split == "val"])
    order = rng.permutation(num_images)
    num_cmyk = (
        min(num_images, max(1, round(NUM_CMYK * num_images / TRAIN_IMAGES)))
        if split == "train"
        else 0
    )
    modes = {int(i): "CMYK" for i in order[:num_cmyk]}
    if split == "train" and num_images > num_cmyk:
        modes[int(order[num_cmyk])] = "PNG"
    gray = order[num_cmyk + 1 :][rng.random(max(num_images - num_cmyk - 1, 0)) < fixture.SHARE_GRAY]
    modes.update({int(i): "L" for i in gray})
    return modes


_photos: list[Image.Image] = []  # per worker process, set by _load_photos


def photo_paths(photos: str) -> list[str]:
    """The bench fixture's colour wallpaper photos ("real"; one line naming the package when they
    are missing), or none ("synthetic": smooth generated images, for the tests' tiny mode)."""
    if photos == "synthetic":
        return []
    sources = [s.origin for s in fixture.find_sources() if s.name.startswith("wallpaper:")]
    if not sources:
        raise SystemExit(
            "scale: needs Debian's plasma-workspace-wallpapers (`make bench` installs them "
            "as root) or --photos synthetic"
        )
    return sources


def _load_photos(paths: list[str]) -> None:
    """Per worker: the photos named by photo_paths, halved; a generated gradient where none."""
    for path in paths:
        with Image.open(path) as image:
            photo = image.convert("RGB")
        _photos.append(photo.reduce(SOURCE_REDUCE) if photo.width > 1600 else photo)
    if not _photos:
        yy, xx = np.mgrid[0:600, 0:800]
        _photos.append(
            Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))
        )


def render(seed: int, split: str, index: int, mode: str) -> bytes:
    """One image's file bytes: a crop of a source photo at 1-2 photo px per image px."""
    rng = np.random.default_rng([seed, 13, split == "val", index])
    width, height = fixture.draw_output_size(rng)
    width, height = max(8, round(width * SIZE_FACTOR)), max(8, round(height * SIZE_FACTOR))
    photo = _photos[int(rng.integers(len(_photos)))]
    box = fixture.draw_crop_box(rng, photo.width, photo.height, width, height)
    image = photo.resize((width, height), Image.Resampling.BILINEAR, box=box)
    out = io.BytesIO()
    if mode == "PNG":
        image.save(out, "PNG")
    else:
        image = image.convert(mode) if mode != "RGB" else image
        image.save(out, "JPEG", quality=int(rng.integers(*QUALITY)), subsampling=2)
    return out.getvalue()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        size,
        FIXED_MTIME,
        0o644,
        0,
        0,
        "",
        "",
    )
    return info


def _tar_bytes(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
    return buffer.getvalue()


def _class_tar(task: tuple) -> tuple[str, bytes, int]:
    """Worker: one `<wnid>.tar` of the train archive, and how many image bytes it holds."""
    seed, wnid, first_index, count, modes = task
    members = [
        (
            f"{wnid}_{number}.JPEG",
            render(seed, "train", first_index + i, modes.get(first_index + i, "RGB")),
        )
        for i, number in enumerate(train_numbers(wnid, count))
    ]
    return f"{wnid}.tar", _tar_bytes(members), sum(len(data) for _, data in members)


def _val_chunk(task: tuple) -> list[bytes]:
    seed, start, stop, modes = task
    return [render(seed, "val", i, modes.get(i, "RGB")) for i in range(start, stop)]


def _write_atomic(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        write(f)
    os.replace(partial, path)


def generate(
    src_dir: Path,
    scale: float = 1.0,
    seed: int = 0,
    workers: int | None = None,
    photos: str = "real",
) -> dict:
    """Write the three archives into src_dir (reused when facts.json matches); return the facts."""
    src_dir = Path(src_dir)
    facts_path = src_dir / "facts.json"
    params = {"scale": scale, "seed": seed, "version": 1, "photos": photos}
    if facts_path.is_file() and json.loads(facts_path.read_text()).get("params") == params:
        return json.loads(facts_path.read_text())
    paths = photo_paths(photos)
    src_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    words = class_words(NUM_CLASSES)
    wnids = [wnid for wnid, _ in words]
    counts = class_counts(scale, seed)
    firsts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    train_modes = image_modes(firsts[-1], seed, "train")
    labels = val_labels(scale, seed)
    val_modes = image_modes(len(labels), seed, "val")
    workers = workers or len(os.sched_getaffinity(0))
    train_tasks = [
        (
            seed,
            wnid,
            firsts[c],
            counts[c],
            {i: m for i, m in train_modes.items() if firsts[c] <= i < firsts[c + 1]},
        )
        for c, wnid in enumerate(wnids)
    ]
    step = 1000
    val_tasks = [
        (
            seed,
            a,
            min(a + step, len(labels)),
            {i: m for i, m in val_modes.items() if a <= i < a + step},
        )
        for a in range(0, len(labels), step)
    ]
    image_bytes = 0
    with get_context("fork").Pool(workers, initializer=_load_photos, initargs=(paths,)) as pool:

        def write_train(f):
            nonlocal image_bytes
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as outer:
                for name, data, nbytes in pool.imap(_class_tar, train_tasks):
                    outer.addfile(_tar_info(name, len(data)), io.BytesIO(data))
                    image_bytes += nbytes

        def write_val(f):
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for (_, start, _, _), datas in zip(val_tasks, pool.imap(_val_chunk, val_tasks)):
                    for i, data in enumerate(datas, start=start):
                        tar.addfile(
                            _tar_info(f"ILSVRC2012_val_{i + 1:08d}.JPEG", len(data)),
                            io.BytesIO(data),
                        )

        _write_atomic(src_dir / TRAIN_TAR, write_train)
        _write_atomic(src_dir / VAL_TAR, write_val)
    ids = devkit_ids(NUM_CLASSES)
    _write_atomic(src_dir / DEVKIT, lambda f: _write_devkit(f, words, ids, labels))
    facts = {
        "params": params,
        "num_classes": NUM_CLASSES,
        "train_images": firsts[-1],
        "val_images": len(labels),
        "train_per_class": [min(counts), max(counts)],
        "train_cmyk": list(train_modes.values()).count("CMYK"),
        "train_png": list(train_modes.values()).count("PNG"),
        "train_gray": list(train_modes.values()).count("L"),
        "val_gray": list(val_modes.values()).count("L"),
        "mean_train_image_bytes": image_bytes / firsts[-1],
        "bytes": {name: (src_dir / name).stat().st_size for name in (TRAIN_TAR, VAL_TAR, DEVKIT)},
        "seconds": time.perf_counter() - started,
        "workers": workers,
    }
    _write_atomic(facts_path, lambda f: f.write(json.dumps(facts, indent=1).encode()))
    return facts


def _write_devkit(f, words: list[tuple[str, str]], ids: tuple[int, ...], labels: list[int]) -> None:
    ground_truth = "".join(f"{ids[label]}\n" for label in labels).encode()
    # prep.sample.archives stores image counts as uint16: 1,000 classes' parents overflow it.
    rows = [row[:5] + (min(row[5], 65535),) for row in synset_rows(words, ids, MAX_PER_CLASS)]
    members = [
        ("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat_bytes(rows)),
        ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", ground_truth),
    ]
    with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(_tar_bytes(members))

"""Build an ImageNet-like fixture of real photos for benchmarks, deterministically.

Noise or flat shapes decode at unrealistic speeds, so benchmark inputs are random crops of real
photos: Debian's plasma-workspace-wallpapers (the photographs among them, at their largest size)
and scikit-image's bundled photos (optional). Crops are taken at or near the source's native
resolution, so they keep real detail, and sized, shaped and encoded like ImageNet train images:
most have a 500 px long side (Flickr's "medium" size), 4:3 or 3:2, ~13% portrait, some square,
some smaller or up to ~1000 px; a few grayscale and CMYK JPEGs, as prep has to handle.

Encoding follows ImageNet rather than a generic quality 90: a survey of the train set's JPEG headers
(Max Ehrlich, "Compression in the ImageNet Dataset", 2021) found most images at quality 96 without
chroma subsampling (4:4:4), which is what gives ImageNet its ~110 KB mean and gives a decoder twice
the coefficient blocks of 4:2:0 (here ~1.9x the decode time). The wallpapers are smoother than
Flickr photos even at native resolution, so mild sensor-like noise (sigma 2-4 levels) tops them up.

Writes DIR/folders/train/<wnid>/<wnid>_<i>.JPEG, DIR/archives/ILSVRC2012_img_train.tar (a tar of
per-class <wnid>.tar, as ImageNet ships it; same bytes) and, last, DIR/fixture.json (parameters
and measured statistics). A DIR whose fixture.json matches the request is reused.

    python bench/fixture.py --out bench/.cache/fixture-2000 \\
        --num-images 2000 --num-classes 20 --seed 0

Bench scripts: ``sys.path.insert(0, str(Path(__file__).parent)); import fixture`` then
``fixture.build_fixture(out_dir, num_images, num_classes, seed)``. Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

FIXTURE_VERSION = 1  # bump whenever the generator changes what it writes: cached fixtures rebuild
TRAIN_TAR_NAME = "ILSVRC2012_img_train.tar"
FIXED_MTIME = 1335830400  # 2012-05-01 UTC, for every tar member and written file
MAX_CLASSES = 10_000  # synthetic wnids n90000000 .. n90009999

WALLPAPER_DIR = Path("/usr/share/wallpapers")
# Digital art and renders among the wallpaper JPEGs: flat regions decode unrealistically fast.
WALLPAPERS_NOT_PHOTOS = frozenset(
    {"Autumn", "Flow", "Honeywave", "PastelHills", "SafeLanding", "Shell", "Volna"}
)
# Real photos bundled with scikit-image (no download); medical and synthetic images left out.
SKIMAGE_COLOR = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right")
SKIMAGE_GRAY = ("camera", "moon", "coins", "grass", "gravel")

SHARE_GRAY = 0.015
SHARE_CMYK = 0.002  # at least one CMYK image whenever num_images >= 200
SHARE_SQUARE = 0.07
SHARE_PORTRAIT = 0.13
SHARE_Q96_444 = 0.8  # ImageNet's dominant setting; the rest: quality 85-95 with 4:2:0
MAX_DOWNSCALE = 2.0  # crops span 1-2 source pixels per output pixel where the source allows
NOISE_SIGMA = (2.0, 4.0)  # std in 8-bit levels at white, drawn per image
MIN_IMAGES_FOR_POOL = 64
NOISE_BANK_SIZE = 1 << 22  # normals; 3 channels x 1000 x 1000 px at most (long side <= 1000)


@dataclass(frozen=True)
class Source:
    """One source photo: where its pixels come from, and its size (so crops can be planned)."""

    name: str  # "wallpaper:Path" or "skimage:astronaut"
    origin: str  # JPEG path, or the skimage.data name
    width: int
    height: int
    gray: bool


def wnid_for(class_index: int) -> str:
    """Synthetic WordNet-style id: 'n' + 8 digits, sorting like the class index."""
    return f"n9000{class_index:04d}"


def find_sources() -> list[Source]:
    """The wallpaper photos (largest JPEG of each) and, if installed, scikit-image's photos."""
    sources = []
    if WALLPAPER_DIR.is_dir():
        for wallpaper_dir in sorted(WALLPAPER_DIR.iterdir()):
            if wallpaper_dir.name in WALLPAPERS_NOT_PHOTOS:
                continue
            sizes = {}
            for path in (wallpaper_dir / "contents" / "images").glob("*.jpg"):
                with Image.open(path) as image:
                    sizes[path] = image.size
            if sizes:
                path = max(sorted(sizes), key=lambda p: sizes[p][0] * sizes[p][1])
                width, height = sizes[path]
                sources.append(
                    Source(f"wallpaper:{wallpaper_dir.name}", str(path), width, height, False)
                )
    try:
        import skimage.data  # noqa: F401  (bench-only dependency)
    except ImportError:
        if sources:  # with neither, the one line below says what to install
            warnings.warn(
                "scikit-image is not installed: fixture uses the wallpaper photos only",
                stacklevel=2,
            )
    else:
        for name in SKIMAGE_COLOR + SKIMAGE_GRAY:
            try:
                pixels = _load_skimage(name)
            # not bundled in this build: skimage would try to download it
            except Exception as error:
                warnings.warn(f"skipping skimage.data.{name}: {error}", stacklevel=2)
                continue
            height, width = pixels.shape[:2]
            sources.append(Source(f"skimage:{name}", name, width, height, pixels.ndim == 2))
    if not any(not s.gray for s in sources):
        raise SystemExit(  # one line for whoever runs a benchmark on a bare machine
            "bench: no colour source photos: `make bench` installs them (as root), or install "
            f"Debian's plasma-workspace-wallpapers ({WALLPAPER_DIR}) and scikit-image"
        )
    return sources


def _load_skimage(name: str) -> np.ndarray:
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skimage.data, name)()


# Per-process state, set by _init_worker (after fork or spawn): the source table and decoded pixels.
_sources: list[Source] = []
_seed = 0
_pixels: dict[str, Image.Image] = {}


def _init_worker(sources: list[Source], seed: int) -> None:
    global _sources, _seed
    _sources, _seed = sources, seed


def _source_image(source: Source) -> Image.Image:
    if source.name not in _pixels:
        if source.name.startswith("wallpaper:"):
            with Image.open(source.origin) as image:
                _pixels[source.name] = image.convert("RGB")
        else:
            _pixels[source.name] = Image.fromarray(_load_skimage(source.origin))
    return _pixels[source.name]


def draw_output_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) like ImageNet train: mostly a 500 px long side, 4:3 or 3:2 landscape."""
    u = rng.random()
    if u < 0.72:
        long_side = 500
    elif u < 0.86:
        long_side = int(rng.integers(240, 500))
    else:
        long_side = int(round(np.exp(rng.uniform(np.log(501), np.log(1000)))))
    shape = rng.random()
    r = rng.random()
    ratio = 4 / 3 if r < 0.6 else 3 / 2 if r < 0.87 else rng.uniform(1.1, 2.0)
    if shape < SHARE_SQUARE:
        return long_side, long_side
    short_side = max(1, int(round(long_side / ratio)))
    if shape < SHARE_SQUARE + SHARE_PORTRAIT:
        return short_side, long_side
    return long_side, short_side


def draw_crop_box(rng: np.random.Generator, src_w: int, src_h: int, out_w: int, out_h: int):
    """A random crop of the output's shape at 1-2 source px per output px (upscales small ones)."""
    max_scale = min(src_w / out_w, src_h / out_h)
    if max_scale >= 1.0:
        scale = float(np.exp(rng.uniform(0.0, np.log(min(max_scale, MAX_DOWNSCALE)))))
    else:
        scale = max_scale * rng.uniform(0.75, 1.0)
    crop_w, crop_h = out_w * scale, out_h * scale
    x = rng.uniform(0.0, src_w - crop_w)
    y = rng.uniform(0.0, src_h - crop_h)
    return (x, y, x + crop_w, y + crop_h)


def add_sensor_noise(pixels: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise as a camera leaves it: mostly shared by the channels (luminance), with
    shot-noise-like amplitude growing with brightness (sigma at white, ~0.45 sigma at black).

    Normals are sliced from a per-process bank at offsets drawn from rng: 3x faster than drawing
    them per image, and as good for a JPEG encoder, which sees each image on its own."""
    height, width = pixels.shape[:2]
    count = height * width
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    bank = _noise_bank(count * channels)
    levels = np.arange(255 * channels + 1, dtype=np.float32) / (255 * channels)
    amplitude = (sigma * np.sqrt(0.2 + 0.8 * levels)).astype(np.float32)
    if channels > 1:  # channel sum by hand: numpy's reduce over a length-3 axis is 10x slower
        brightness = pixels[..., 0].astype(np.uint16)
        for channel in range(1, channels):
            brightness += pixels[..., channel]
        amplitude = amplitude[brightness]
    else:
        amplitude = amplitude[pixels]
    luma_at = int(rng.integers(0, bank.size - count + 1))
    noise = bank[luma_at : luma_at + count].reshape(height, width, 1) * amplitude[..., None]
    if channels > 1:  # a weaker independent part per channel: chroma noise
        chroma_at = int(rng.integers(0, bank.size - count * channels + 1))
        chroma = bank[chroma_at : chroma_at + count * channels].reshape(height, width, channels)
        noise = (noise + np.float32(0.35) * chroma * amplitude[..., None]) * np.float32(1 / 1.06)
    noise += pixels.reshape(height, width, channels)
    noise += np.float32(0.5)
    np.clip(noise, 0, 255, out=noise)
    return noise.astype(np.uint8).reshape(pixels.shape)


_bank: np.ndarray | None = None


def _noise_bank(min_size: int) -> np.ndarray:
    """Fixed-size bank (offsets drawn from it must not depend on which images a process saw)."""
    global _bank
    if _bank is None:
        _bank = np.random.default_rng(20120501).standard_normal(NOISE_BANK_SIZE, dtype=np.float32)
    if min_size > _bank.size:
        raise ValueError(f"image of {min_size} samples exceeds the noise bank ({_bank.size})")
    return _bank


def render_image(task: tuple[int, str]) -> tuple[int, bytes, dict]:
    """Image `index` of the fixture in colour mode `mode` ("RGB", "L", "CMYK"): JPEG bytes + facts.

    Every random choice comes from (seed, index), so the result does not depend on the worker."""
    index, mode = task
    rng = np.random.default_rng([_seed, 1, index])
    out_w, out_h = draw_output_size(rng)
    gray_sources = [s for s in _sources if s.gray]
    use_gray_source = mode == "L" and bool(gray_sources) and rng.random() < 0.5
    pool = gray_sources if use_gray_source else [s for s in _sources if not s.gray]
    weights = np.sqrt([s.width * s.height for s in pool])
    source = pool[int(rng.choice(len(pool), p=weights / weights.sum()))]
    box = draw_crop_box(rng, source.width, source.height, out_w, out_h)
    image = _source_image(source).resize((out_w, out_h), Image.Resampling.LANCZOS, box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if mode == "L":
        image = image.convert("L")
    sigma = float(rng.uniform(*NOISE_SIGMA))
    image = Image.fromarray(add_sensor_noise(np.asarray(image), sigma, rng))
    if mode == "CMYK":
        image = image.convert("CMYK")
    if rng.random() < SHARE_Q96_444:
        quality, subsampling = 96, 0
    else:
        quality, subsampling = int(rng.integers(85, 96)), 2
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as written:  # measure what was written, not what was meant
        width, height = written.size
        written_mode = written.mode
    facts = {
        "width": width,
        "height": height,
        "mode": written_mode,
        "bytes": len(data),
        "quality": quality,
        "subsampling": "4:4:4" if subsampling == 0 else "4:2:0",
        "source": source.name,
        "noise_sigma": round(sigma, 3),
    }
    return index, data, facts


def plan_modes(num_images: int, seed: int) -> list[str]:
    """Colour mode per image, with exact counts (so small fixtures still get their odd images)."""
    num_cmyk = max(1 if num_images >= 200 else 0, round(SHARE_CMYK * num_images))
    num_gray = round(SHARE_GRAY * num_images)
    order = np.random.default_rng([seed, 0]).permutation(num_images)
    modes = ["RGB"] * num_images
    for index in order[:num_cmyk]:
        modes[index] = "CMYK"
    for index in order[num_cmyk : num_cmyk + num_gray]:
        modes[index] = "L"
    return modes


def plan_labels(num_images: int, num_classes: int, seed: int) -> list[int]:
    """Class per image: balanced (round-robin), in a seeded random order."""
    rng = np.random.default_rng([seed, 2])
    return [int(c) for c in rng.permutation(np.arange(num_images) % num_classes)]


def summarize(facts: list[dict]) -> dict:
    """Measured statistics of the written images (pure)."""
    count = len(facts)
    kbs = [f["bytes"] / 1024 for f in facts]
    long_sides = [max(f["width"], f["height"]) for f in facts]
    modes = [f["mode"] for f in facts]
    num_portrait = sum(f["height"] > f["width"] for f in facts)
    return {
        "count": count,
        "median_width": statistics.median(f["width"] for f in facts),
        "median_height": statistics.median(f["height"] for f in facts),
        "share_long_side_500": round(sum(s == 500 for s in long_sides) / count, 4),
        "min_long_side": min(long_sides),
        "max_long_side": max(long_sides),
        "mean_kb": round(statistics.fmean(kbs), 2),
        "median_kb": round(statistics.median(kbs), 2),
        "total_mb": round(sum(kbs) / 1024, 2),
        "num_portrait": num_portrait,
        "share_portrait": round(num_portrait / count, 4),
        "num_square": sum(f["height"] == f["width"] for f in facts),
        "num_gray": modes.count("L"),
        "share_gray": round(modes.count("L") / count, 4),
        "num_cmyk": modes.count("CMYK"),
        "share_cmyk": round(modes.count("CMYK") / count, 4),
        "share_q96_444": round(sum(f["subsampling"] == "4:4:4" for f in facts) / count, 4),
        "mean_noise_sigma": round(statistics.fmean(f["noise_sigma"] for f in facts), 3),
    }


def library_versions() -> dict:
    import PIL
    from PIL import features

    return {
        "pillow": PIL.__version__,
        "pillow_simd": ".post" in PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "numpy": np.__version__,
    }


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, FIXED_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_train_tar(train_dir: Path, tar_path: Path, names_by_wnid: dict[str, list[str]]) -> None:
    """ImageNet's train layout: a tar of per-class `<wnid>.tar`, each of flat `<wnid>_<i>.JPEG`."""
    partial_path = tar_path.with_name(tar_path.name + ".partial")
    with tarfile.open(partial_path, "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in sorted(names_by_wnid):
            with tempfile.SpooledTemporaryFile(
                max_size=256 << 20, dir=tar_path.parent
            ) as inner_file:
                with tarfile.open(fileobj=inner_file, mode="w", format=tarfile.GNU_FORMAT) as inner:
                    for name in names_by_wnid[wnid]:
                        data = (train_dir / wnid / name).read_bytes()
                        inner.addfile(_tar_info(name, len(data)), io.BytesIO(data))
                size = inner_file.tell()
                inner_file.seek(0)
                outer.addfile(_tar_info(f"{wnid}.tar", size), inner_file)
    os.replace(partial_path, tar_path)


def _requested(num_images: int, num_classes: int, seed: int, sources: list[Source]) -> dict:
    return {
        "fixture_version": FIXTURE_VERSION,
        "num_images": num_images,
        "num_classes": num_classes,
        "seed": seed,
        "sources": [s.name for s in sources],
    }


def build_fixture(
    out_dir: Path, num_images: int, num_classes: int, seed: int, *, quiet: bool = False
) -> dict:
    """Build (or reuse) the fixture in out_dir; return fixture.json's content ("stats" too)."""
    if num_images < 1 or not 1 <= num_classes <= min(num_images, MAX_CLASSES) or seed < 0:
        raise ValueError(
            f"need num_images >= 1, 1 <= num_classes <= min(num_images, {MAX_CLASSES}), "
            f"seed >= 0; got {num_images}, {num_classes}, {seed}"
        )
    out_dir = Path(out_dir)
    record_path = out_dir / "fixture.json"
    train_dir = out_dir / "folders" / "train"
    tar_path = out_dir / "archives" / TRAIN_TAR_NAME
    sources = find_sources()
    requested = _requested(num_images, num_classes, seed, sources)
    if record_path.is_file() and tar_path.is_file() and train_dir.is_dir():
        record = json.loads(record_path.read_text())
        if record.get("params") == requested:
            if not quiet:
                print(
                    f"fixture: reusing {out_dir} ({num_images} images, {num_classes} classes, "
                    f"seed {seed})"
                )
            return record

    start = time.perf_counter()
    record_path.unlink(missing_ok=True)  # written last: no fixture.json, no fixture
    for stale in (train_dir.parent, tar_path.parent):
        shutil.rmtree(stale, ignore_errors=True)
    tar_path.parent.mkdir(parents=True)
    wnids = [wnid_for(c) for c in range(num_classes)]
    for wnid in wnids:
        (train_dir / wnid).mkdir(parents=True)
    labels = plan_labels(num_images, num_classes, seed)
    tasks = list(enumerate(plan_modes(num_images, seed)))
    facts: list[dict] = [{}] * num_images

    def write(index: int, data: bytes, image_facts: dict) -> None:
        path = train_dir / wnids[labels[index]] / f"{wnids[labels[index]]}_{index}.JPEG"
        path.write_bytes(data)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))
        facts[index] = image_facts

    progress = tqdm(total=num_images, desc="fixture", unit="img", disable=quiet)
    num_workers = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    if num_images >= MIN_IMAGES_FOR_POOL and num_workers > 1:
        with Pool(num_workers, initializer=_init_worker, initargs=(sources, seed)) as pool:
            for result in pool.imap_unordered(render_image, tasks, chunksize=8):
                write(*result)
                progress.update()
    else:
        _init_worker(sources, seed)
        for task in tasks:
            write(*render_image(task))
            progress.update()
    progress.close()

    names_by_wnid: dict[str, list[str]] = {wnid: [] for wnid in wnids}
    for index, label in enumerate(labels):
        names_by_wnid[wnids[label]].append(f"{wnids[label]}_{index}.JPEG")
    write_train_tar(train_dir, tar_path, names_by_wnid)

    record = {
        "params": requested,
        "stats": summarize(facts),
        "library": library_versions(),
        "sources": [asdict(s) for s in sources],
        "paths": {"train_dir": "folders/train", "train_tar": f"archives/{TRAIN_TAR_NAME}"},
    }
    partial_record = record_path.with_name("fixture.json.partial")
    partial_record.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial_record, record_path)
    if not quiet:
        stats = record["stats"]
        print(
            f"fixture: built {out_dir} in {time.perf_counter() - start:.1f} s: {stats['count']} "
            "images, "
            f"median {stats['median_width']}x{stats['median_height']}, mean {stats['mean_kb']} KB "
            f"(median {stats['median_kb']} KB), {stats['num_portrait']} portrait, "
            f"{stats['num_gray']} gray, {stats['num_cmyk']} CMYK"
        )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="fixture directory")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    build_fixture(args.out, args.num_images, args.num_classes, args.seed, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())

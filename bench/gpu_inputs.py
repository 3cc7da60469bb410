"""bench/gpu.py's inputs: the real-photo fixture (bench/fixture.py) and its LMDB shards, built
where the benchmark runs (a device machine starts bare) and reused when already there.

The fixture draws its photos from Debian's wallpapers (/usr/share/wallpapers); a machine
without them gets the same photos carried in a folder (`export_sources` writes one:
~6 MB), named with --wallpaper-dir. `--photos synthetic` lays out `prep sample`'s generated
images instead (CPU rehearsals and their tests: no photo package needed).
"""
from __future__ import annotations

import json
import shutil
import tarfile
import subprocess
import sys
from pathlib import Path

import fixture  # bench/fixture.py (bench/ is on sys.path)
from formats.errors import DatasetError
from formats.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent


def export_sources(out_dir: Path) -> list[Path]:
    """Copy the wallpaper photos the fixture uses (largest JPEG of each) to out_dir, in the
    wallpaper tree's layout, so --wallpaper-dir out_dir finds the same sources elsewhere."""
    copied = []
    for source in fixture.find_sources():
        if not source.name.startswith("wallpaper:"):
            continue
        origin = Path(source.origin)
        target = Path(out_dir) / origin.relative_to(fixture.WALLPAPER_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, target)
        copied.append(target)
    return copied


def build_fixture(fixture_dir: Path, num_images: int, num_classes: int,
                  wallpaper_dir: Path | None) -> dict:
    """bench/fixture.py's fixture (reused when its parameters match); its fixture.json."""
    if wallpaper_dir is not None:
        if not Path(wallpaper_dir).is_dir():
            raise SystemExit(f"--wallpaper-dir {wallpaper_dir}: no such directory")
        fixture.WALLPAPER_DIR = Path(wallpaper_dir)
    return fixture.build_fixture(fixture_dir, num_images, num_classes, 0, quiet=True)


def build_inputs_fixture(fixture_dir: Path, num_images: int, num_classes: int,
                         wallpaper_dir: Path | None, photos: str) -> dict:
    """The fixture `photos` names: "real" (bench/fixture.py) or "synthetic" (prep sample's)."""
    if photos == "synthetic":
        return synthetic_fixture(fixture_dir, num_images, num_classes)
    return build_fixture(fixture_dir, num_images, num_classes, wallpaper_dir)


def synthetic_fixture(fixture_dir: Path, num_images: int, num_classes: int) -> dict:
    """bench/fixture.py's layout (archives/<train tar>, folders/train/<wnid>/) holding
    `prep sample`'s generated images; reused when its parameters match."""
    from prep.sample import write_sample

    fixture_dir = Path(fixture_dir)
    record_path = fixture_dir / "fixture.json"
    params = {"photos": "synthetic", "num_images": num_images, "num_classes": num_classes}
    if record_path.is_file() and json.loads(record_path.read_text()).get("params") == params:
        return json.loads(record_path.read_text())
    per_class = max(1, num_images // num_classes)
    info = write_sample(fixture_dir / "archives", num_classes=num_classes, train_per_class=per_class,
                        val_per_class=1)
    with tarfile.open(info.train_tar_path) as outer:
        for class_member in outer:
            folder = fixture_dir / "folders" / "train" / Path(class_member.name).stem
            folder.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=outer.extractfile(class_member)) as inner:
                for member in inner:
                    (folder / member.name).write_bytes(inner.extractfile(member).read())
    record = {"params": params, "stats": {"count": per_class * num_classes, "photos": "synthetic"}}
    record_path.write_text(json.dumps(record))
    return record


def existing_fixture(fixture_dir: Path) -> dict:
    """A fixture made elsewhere: folders/train/<wnid>/*.JPEG and archives/<train tar>."""
    fixture_dir = Path(fixture_dir)
    train_dir = fixture_dir / "folders" / "train"
    tar_path = fixture_dir / "archives" / fixture.TRAIN_TAR_NAME
    if not train_dir.is_dir() or not tar_path.is_file():
        raise SystemExit(f"--fixture-dir {fixture_dir}: needs folders/train/ and "
                         f"archives/{fixture.TRAIN_TAR_NAME} (bench/fixture.py's layout)")
    count = sum(1 for _ in train_dir.glob("*/*.JPEG"))
    return {"params": {"num_images": count}, "stats": {"count": count}}


def _complete(dataset_dir: Path, num_images: int) -> bool:
    """Built from this fixture: a manifest (written last) that accounts for every image.
    Reads the manifest only, so no LMDB environment is opened before the loaders fork."""
    try:
        manifest = read_manifest(dataset_dir)
    except DatasetError:
        return False
    return manifest.count + len(manifest.rejects) == num_images


def build_shards(fixture_dir: Path, out_dir: Path, prep_sizes: list[int], num_images: int,
                 workers: int) -> dict[int, Path]:
    """{prep_size: out_dir/train-<prep_size>} via `prep build-lmdb`, only the missing sizes."""
    todo = [size for size in sorted(prep_sizes) if not _complete(out_dir / f"train-{size}", num_images)]
    if todo:
        args = [sys.executable, "-m", "prep.cli", "build-lmdb", "--src", str(fixture_dir / "archives"),
                "--out", str(out_dir), "--overwrite", "-q", "--workers", str(workers)]
        args += [a for size in todo for a in ("--size", str(size))]
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"prep {' '.join(args[3:])} failed:\n{done.stdout}{done.stderr}")
    return {size: out_dir / f"train-{size}" for size in prep_sizes}

"""`prep sample`: a small procedural dataset in the exact ILSVRC2012 archive layout.

It lets the whole pipeline (raw tars -> shards -> training) run, and be tested, with no download.
It copies what trips real readers: a tar of per-class tars, a flat val tar in shuffled class
order, a devkit whose ILSVRC2012_IDs are NOT in sorted-wnid order, and the odd files (grayscale,
CMYK, a PNG named .JPEG). Output is byte-identical for a given seed.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
import scipy.io

from prep.sample.images import class_style, draw_shape, encode_image, render_image

TRAIN_TAR_NAME = "ILSVRC2012_img_train.tar"
VAL_TAR_NAME = "ILSVRC2012_img_val.tar"
DEVKIT_NAME = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)
TAR_MTIME = 1_335_830_400  # 2012-05-01; any constant keeps archives byte-identical
# Imagenette's ten classes, with ImageNet's own `words` (synonyms joined by ", ").
IMAGENETTE = (
    ("n01440764", "tench, Tinca tinca"),
    ("n02102040", "English springer, English springer spaniel"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw, chainsaw"),
    ("n03028079", "church, church building"),
    ("n03394916", "French horn, horn"),
    ("n03417042", "garbage truck, dustcart"),
    ("n03425413", "gas pump, gasoline pump, petrol pump, island dispenser"),
    ("n03445777", "golf ball"),
    ("n03888605", "parachute, chute"),
)
# Non-leaf synsets: a root and two groups that split the leaves.
PARENTS = (
    ("n00001740", "entity"),
    ("n00001930", "physical entity"),
    ("n00002137", "abstraction, abstract entity"),
)
ADJECTIVES = ("striped", "spotted", "woven", "rippled", "banded", "speckled", "ringed", "checkered")
NOUNS = (
    "kettle",
    "lantern",
    "beetle",
    "teapot",
    "marble",
    "kite",
    "barrel",
    "pebble",
    "shell",
    "drum",
)


@dataclass(frozen=True)
class SampleInfo:
    """What write_sample wrote, and the ground truth tests need to check a reader against."""

    train_tar_path: Path
    val_tar_path: Path
    devkit_path: Path
    wnids: tuple[str, ...]  # sorted: a class index is a position in this tuple
    class_names: tuple[str, ...]  # first synonym of each class's `words`, by class index
    # devkit ILSVRC2012_ID of each class, by class index (a permutation)
    ilsvrc_ids: tuple[int, ...]
    val_labels: tuple[int, ...]  # class index of ILSVRC2012_val_{i+1:08d}.JPEG at position i
    train_per_class: int
    val_per_class: int
    gray_train_name: str  # member names: `<wnid>_<n>.JPEG` inside `<wnid>.tar`, or the val file
    cmyk_train_name: str
    png_train_name: str
    gray_val_name: str

    @property
    def num_classes(self) -> int:
        return len(self.wnids)


@dataclass(frozen=True)
class _ImageSpec:
    name: str
    class_index: int
    kind: str  # "rgb", "gray", "cmyk", "png": see encode_image
    force_shape: str | None  # "tiny", "portrait", "large": guarantee each appears
    seed: tuple[int, ...]


def class_words(num_classes: int) -> list[tuple[str, str]]:
    """(wnid, words) sorted by wnid: Imagenette's first, then made-up but plausible ones."""
    chosen = list(IMAGENETTE[:num_classes])
    rng = np.random.default_rng(2012)
    taken = {wnid for wnid, _ in IMAGENETTE} | {wnid for wnid, _ in PARENTS}
    while len(chosen) < num_classes:
        wnid = f"n{int(rng.integers(1_000_000, 15_000_000)):08d}"
        if wnid not in taken:
            i = len(chosen) - len(IMAGENETTE)
            name = f"{ADJECTIVES[i % len(ADJECTIVES)]} {NOUNS[i // len(ADJECTIVES) % len(NOUNS)]}"
            suffix = (
                f" {i // (len(ADJECTIVES) * len(NOUNS)) + 1}"
                if i >= len(ADJECTIVES) * len(NOUNS)
                else ""
            )
            chosen.append((wnid, name + suffix))
            taken.add(wnid)
    return sorted(chosen)


def devkit_ids(num_classes: int) -> tuple[int, ...]:
    """ILSVRC2012_ID per class index: a fixed shuffle of 1..K, never the identity (as the real
    devkit, whose IDs follow the WordNet hierarchy, not wnid order)."""
    order = np.random.default_rng(1860).permutation(num_classes)
    if num_classes > 1 and np.array_equal(order, np.arange(num_classes)):
        order = np.roll(order, 1)
    return tuple(int(i) + 1 for i in order)


def train_numbers(wnid: str, count: int) -> list[int]:
    """Image numbers within a class: sorted, unique and gappy like n01440764_10026.JPEG."""
    rng = np.random.default_rng(int(wnid[1:]))
    return sorted(
        int(n) for n in rng.choice(np.arange(1, max(15_000, 2 * count)), size=count, replace=False)
    )


def _forced_shapes(count: int) -> dict[int, str]:
    """The last images of a split are tiny, portrait and large, so every run has each kind."""
    return {
        count - 1 - i: kind
        for i, kind in enumerate(("tiny", "portrait", "large"))
        if count - 1 - i >= 0
    }


def _train_specs(wnids: list[str], train_per_class: int, seed: int) -> list[_ImageSpec]:
    num_classes = len(wnids)
    # Quirk q goes to class q % K, image q // K: distinct files whatever the counts.
    quirks = {
        (q % num_classes, q // num_classes): kind for q, kind in enumerate(("gray", "cmyk", "png"))
    }
    forced = _forced_shapes(num_classes * train_per_class)
    specs = []
    for class_index, wnid in enumerate(wnids):
        for image_index, number in enumerate(train_numbers(wnid, train_per_class)):
            flat = class_index * train_per_class + image_index
            kind = quirks.get((class_index, image_index), "rgb")
            specs.append(
                _ImageSpec(
                    f"{wnid}_{number}.JPEG", class_index, kind, forced.get(flat), (seed, 0, flat)
                )
            )
    return specs


def _val_specs(val_labels: list[int], seed: int) -> list[_ImageSpec]:
    forced = _forced_shapes(len(val_labels))
    return [
        _ImageSpec(
            f"ILSVRC2012_val_{i + 1:08d}.JPEG",
            label,
            "gray" if i == 0 else "rgb",
            forced.get(i),
            (seed, 1, i),
        )
        for i, label in enumerate(val_labels)
    ]


def _render(spec: _ImageSpec, num_classes: int) -> bytes:
    rng = np.random.default_rng(spec.seed)
    shape = draw_shape(rng, force=spec.force_shape)
    return encode_image(
        render_image(class_style(spec.class_index, num_classes), shape, rng), spec.kind
    )


def synset_rows(
    words_by_class: list[tuple[str, str]], ilsvrc_ids: tuple[int, ...], train_per_class: int
) -> list[tuple]:
    """meta.mat's synsets as (wnid, words, gloss, children, wordnet_height, num_train_images), in
    ILSVRC2012_ID order as the real file: leaves (no children) are IDs 1..K, then three parents
    above them (the real file has 860 non-leaf synsets after its 1000 leaves)."""
    num_classes = len(words_by_class)
    rows: list[tuple] = [()] * num_classes
    for class_index, (wnid, words) in enumerate(words_by_class):
        gloss = f"synthetic class with a {class_style(class_index, num_classes).texture} texture"
        rows[ilsvrc_ids[class_index] - 1] = (
            wnid,
            words,
            gloss,
            np.zeros((0, 0), np.uint16),
            0,
            train_per_class,
        )
    leaf_ids = np.arange(1, num_classes + 1, dtype=np.uint16)
    half, root_id = (num_classes + 1) // 2, num_classes + 1
    child_lists = (
        np.array([root_id + 1, root_id + 2], np.uint16),
        leaf_ids[:half],
        leaf_ids[half:],
    )
    for (wnid, words), children, height in zip(PARENTS, child_lists, (2, 1, 1)):
        num_images = train_per_class * (num_classes if height == 2 else len(children))
        rows.append(
            (
                wnid,
                words,
                f"{words.split(', ')[0]}: a non-leaf synset",
                children,
                height,
                num_images,
            )
        )
    return rows


def meta_mat_bytes(rows: list[tuple]) -> bytes:
    """The `synsets` struct array (fields in the real order) as MAT v5 bytes, free of timestamps."""
    synsets = np.empty((len(rows), 1), dtype=[(field, object) for field in META_FIELDS])
    for i, (wnid, words, gloss, children, height, num_images) in enumerate(rows):
        synsets[i, 0] = (
            np.uint16(i + 1),
            wnid,
            words,
            gloss,
            np.uint16(len(children)),
            children,
            np.uint8(height),
            np.uint16(num_images),
        )
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets}, format="5")
    data = bytearray(buffer.getvalue())
    # savemat stamps the time here
    data[:116] = b"MATLAB 5.0 MAT-file, written by shardtrain prep sample".ljust(116)
    return bytes(data)


def _tar_member(name: str, data: bytes | None) -> tarfile.TarInfo:
    """A member header with fixed owner and time, so archives depend only on their contents."""
    info = tarfile.TarInfo(name)
    info.size = 0 if data is None else len(data)
    info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
    info.mode = 0o755 if data is None else 0o644
    info.mtime, info.uid, info.gid, info.uname, info.gname = TAR_MTIME, 0, 0, "", ""
    return info


def _write_tar(fileobj: BinaryIO, members: Iterable[tuple[str, bytes | None]]) -> None:
    """Writes (name, bytes) members in the given order; bytes None makes a directory."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tar_member(name, data), None if data is None else io.BytesIO(data))


def _tar_bytes(members: Iterable[tuple[str, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    _write_tar(buffer, members)
    return buffer.getvalue()


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """An open file that appears at `path` only once fully written (os.replace from a temp)."""
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "wb") as file:
            yield file
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _class_tars(
    wnids: list[str], specs: list[_ImageSpec], images: Iterator[bytes]
) -> Iterator[tuple[str, bytes]]:
    """(`<wnid>.tar`, bytes) per class, consuming rendered images in spec order."""
    per_class = len(specs) // len(wnids)
    for class_index, wnid in enumerate(wnids):
        class_specs = specs[class_index * per_class : (class_index + 1) * per_class]
        yield f"{wnid}.tar", _tar_bytes((spec.name, next(images)) for spec in class_specs)


def write_sample(
    out_dir: Path,
    *,
    num_classes: int = 10,
    train_per_class: int = 80,
    val_per_class: int = 20,
    seed: int = 0,
) -> SampleInfo:
    """Writes the three ILSVRC2012 archives into out_dir (made if missing); says what they hold."""
    if (
        num_classes < 2
        or train_per_class < 1
        or val_per_class < 1
        or num_classes * train_per_class < 3
    ):
        raise ValueError(
            "need num_classes >= 2, per-class counts >= 1 and at least 3 train images (for the "
            "quirks)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words_by_class = class_words(num_classes)
    wnids = [wnid for wnid, _ in words_by_class]
    ilsvrc_ids = devkit_ids(num_classes)
    val_rng = np.random.default_rng((seed, 2))
    val_labels = [
        int(c) for c in val_rng.permutation(np.repeat(np.arange(num_classes), val_per_class))
    ]
    train_specs, val_specs = (
        _train_specs(wnids, train_per_class, seed),
        _val_specs(val_labels, seed),
    )

    paths = {name: out_dir / name for name in (TRAIN_TAR_NAME, VAL_TAR_NAME, DEVKIT_NAME)}
    # Serial on purpose: threads measured no faster (small numpy ops hold the GIL), and a spawn
    # pool breaks callers without a __main__ guard, for ~1 s saved on the defaults.
    render = functools.partial(_render, num_classes=num_classes)
    with _atomic_file(paths[TRAIN_TAR_NAME]) as file:
        _write_tar(file, _class_tars(wnids, train_specs, map(render, train_specs)))
    with _atomic_file(paths[VAL_TAR_NAME]) as file:
        _write_tar(file, zip([spec.name for spec in val_specs], map(render, val_specs)))
    ground_truth = "".join(f"{ilsvrc_ids[label]}\n" for label in val_labels).encode()
    devkit_members = [
        (f"{DEVKIT_DIR}/", None),
        (f"{DEVKIT_DIR}/data/", None),
        (
            f"{DEVKIT_DIR}/data/meta.mat",
            meta_mat_bytes(synset_rows(words_by_class, ilsvrc_ids, train_per_class)),
        ),
        (f"{DEVKIT_DIR}/data/ILSVRC2012_validation_ground_truth.txt", ground_truth),
    ]
    with (
        _atomic_file(paths[DEVKIT_NAME]) as file,
        gzip.GzipFile(filename="", mode="wb", fileobj=file, mtime=0) as gz,
    ):
        _write_tar(gz, devkit_members)

    quirk_names = {spec.kind: spec.name for spec in train_specs if spec.kind != "rgb"}
    return SampleInfo(
        train_tar_path=paths[TRAIN_TAR_NAME],
        val_tar_path=paths[VAL_TAR_NAME],
        devkit_path=paths[DEVKIT_NAME],
        wnids=tuple(wnids),
        class_names=tuple(words.split(", ")[0] for _, words in words_by_class),
        ilsvrc_ids=ilsvrc_ids,
        val_labels=tuple(val_labels),
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        gray_train_name=quirk_names["gray"],
        cmyk_train_name=quirk_names["cmyk"],
        png_train_name=quirk_names["png"],
        gray_val_name=val_specs[0].name,
    )

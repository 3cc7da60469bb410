"""Class lists and validation labels: the devkit, Kaggle's files, plain label files.

The class index is the position of the wnid in sorted order, as torchvision and every ImageNet
trainer use; the devkit's ILSVRC2012_IDs are a different order and are only used to read its
ground-truth file.
"""
from __future__ import annotations

import csv
import io
import re
import tarfile
from pathlib import Path

DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
VAL_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_SYNSET_MAPPING = "LOC_synset_mapping.txt"


class SourceError(Exception):
    """The source is missing, unreadable or not laid out like ImageNet: one line for the user."""


def class_index(wnids) -> dict[str, int]:
    """wnid -> label: sorted order. The one place this mapping is made."""
    return {wnid: label for label, wnid in enumerate(sorted(set(wnids)))}


def image_key(name: str) -> str:
    """`ILSVRC2012_val_00000001.JPEG`, `val/x/ILSVRC2012_val_00000001` -> `ILSVRC2012_val_00000001`."""
    return Path(name).name.split(".")[0]


class Devkit:
    """The ILSVRC2012 devkit, from the .tar.gz (read in place) or an extracted directory."""

    def __init__(self, meta_mat: bytes, ground_truth: bytes):
        import scipy.io  # only sources that have a devkit pay for scipy's import

        try:
            synsets = scipy.io.loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
        except (ValueError, KeyError, TypeError) as err:
            raise SourceError(f"devkit meta.mat is unreadable ({err})") from None
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        self.wnid_by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        self.names = {str(s["WNID"]): str(s["words"]) for s in leaves}
        self.val_ids = [int(line) for line in ground_truth.decode().split()]

    @classmethod
    def find(cls, src_dir: Path) -> "Devkit | None":
        archive = src_dir / DEVKIT_ARCHIVE
        if archive.is_file():
            try:
                with tarfile.open(archive, "r:*") as tar:
                    files = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
                    if META_MAT not in files or VAL_GROUND_TRUTH not in files:
                        raise SourceError(f"{archive}: no {META_MAT} or {VAL_GROUND_TRUTH} inside")
                    return cls(tar.extractfile(files[META_MAT]).read(),
                               tar.extractfile(files[VAL_GROUND_TRUTH]).read())
            except (tarfile.TarError, OSError, EOFError) as err:
                raise SourceError(f"{archive}: unreadable devkit ({err})") from None
        extracted = src_dir / DEVKIT_DIR
        if (extracted / META_MAT).is_file() and (extracted / VAL_GROUND_TRUTH).is_file():
            return cls((extracted / META_MAT).read_bytes(), (extracted / VAL_GROUND_TRUTH).read_bytes())
        return None

    def val_wnids(self) -> dict[str, str]:
        """Image key -> wnid; ground-truth line i is ILSVRC2012_val_<i, 8 digits>."""
        try:
            return {f"ILSVRC2012_val_{i:08d}": self.wnid_by_id[devkit_id]
                    for i, devkit_id in enumerate(self.val_ids, start=1)}
        except KeyError as err:
            raise SourceError(f"devkit ground truth names unknown ILSVRC2012_ID {err}") from None


def read_label_file(path: Path, classes: list[str]) -> dict[str, str]:
    """Image key -> wnid from Kaggle's LOC_val_solution.csv or a plain `filename label` file,
    where label is a wnid or a 0-based index in sorted-wnid order."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: cannot read labels ({err})") from None
    if text.startswith("ImageId,PredictionString"):
        rows = csv.reader(io.StringIO(text))
        next(rows)
        return {image_key(row[0]): row[1].split()[0] for row in rows if len(row) >= 2 and row[1]}
    labels = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise SourceError(f"{path}:{number}: expected `filename label`, got {line!r}")
        name, label = fields
        if label.isdigit():
            if not classes or int(label) >= len(classes):
                raise SourceError(f"{path}:{number}: label {label} but {len(classes)} known classes")
            label = sorted(classes)[int(label)]
        labels[image_key(name)] = label
    return labels


def read_synset_mapping(path: Path) -> dict[str, str]:
    """Kaggle's `LOC_synset_mapping.txt`: `n01440764 tench, Tinca tinca` per line."""
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, words = line.partition(" ")
        if re.fullmatch(r"n\d{8}", wnid):
            names[wnid] = words.strip()
    return names

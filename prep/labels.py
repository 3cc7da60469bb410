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
import zlib
from pathlib import Path

DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
VAL_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_SYNSET_MAPPING = "LOC_synset_mapping.txt"
# The devkit's compression, from its first bytes: tarfile's "r:*" would try every method on a
# damaged stream and report each one's failure (5 lines for one corrupt gzip).
_COMPRESSION_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))


class SourceError(Exception):
    """The source is missing, unreadable or not laid out like ImageNet: one line for the user."""


def class_index(wnids) -> dict[str, int]:
    """wnid -> label: sorted order. The one place this mapping is made."""
    return {wnid: label for label, wnid in enumerate(sorted(set(wnids)))}


def image_key(name: str) -> str:
    """`ILSVRC2012_val_00000001.JPEG`, `val/x/ILSVRC2012_val_00000001` ->
    `ILSVRC2012_val_00000001`."""
    return Path(name).name.split(".")[0]


def _compression(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in _COMPRESSION_MAGIC if head.startswith(magic)), "")


class Devkit:
    """The ILSVRC2012 devkit, from the .tar.gz (read in place) or an extracted directory."""

    def __init__(self, meta_mat: bytes, ground_truth: bytes):
        import scipy.io  # only sources that have a devkit pay for scipy's import

        try:
            synsets = scipy.io.loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
            leaves = [s for s in synsets if int(s["num_children"]) == 0]
            self.wnid_by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
            self.names = {str(s["WNID"]): str(s["words"]) for s in leaves}
        except Exception as err:  # scipy and numpy raise many kinds on a damaged .mat
            raise SourceError(
                f"devkit {META_MAT} is unreadable ({type(err).__name__}: {err})"
            ) from None
        self.val_ids = parse_ground_truth(ground_truth)

    @classmethod
    def find(cls, src_dir: Path) -> "Devkit | None":
        archive = src_dir / DEVKIT_ARCHIVE
        if archive.is_file():
            try:
                with tarfile.open(archive, f"r:{_compression(archive)}") as tar:
                    files = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
                    if META_MAT not in files or VAL_GROUND_TRUTH not in files:
                        raise SourceError(f"{archive}: no {META_MAT} or {VAL_GROUND_TRUTH} inside")
                    return cls(
                        tar.extractfile(files[META_MAT]).read(),
                        tar.extractfile(files[VAL_GROUND_TRUTH]).read(),
                    )
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise SourceError(f"{archive}: unreadable devkit ({reason})") from None
        extracted = src_dir / DEVKIT_DIR
        if (extracted / META_MAT).is_file() and (extracted / VAL_GROUND_TRUTH).is_file():
            return cls(
                (extracted / META_MAT).read_bytes(), (extracted / VAL_GROUND_TRUTH).read_bytes()
            )
        return None

    def val_wnids(self) -> dict[str, str]:
        """Image key -> wnid; ground-truth line i is ILSVRC2012_val_<i, 8 digits>."""
        try:
            return {
                f"ILSVRC2012_val_{i:08d}": self.wnid_by_id[devkit_id]
                for i, devkit_id in enumerate(self.val_ids, start=1)
            }
        except KeyError as err:
            raise SourceError(f"devkit ground truth names unknown ILSVRC2012_ID {err}") from None


def _text(data: bytes, what: str) -> str:
    """UTF-8 text with an optional byte-order mark (as Windows tools write it)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceError(f"{what}: not UTF-8 text ({err})") from None


def parse_ground_truth(data: bytes) -> list[int]:
    """The devkit's validation ground truth: line i holds the ILSVRC2012_ID of val image i.
    A blank or non-integer line would shift every later label, so it is refused, not skipped."""
    lines = _text(data, VAL_GROUND_TRUTH).splitlines()  # CRLF too
    while lines and not lines[-1].strip():
        lines.pop()
    ids = []
    for number, line in enumerate(lines, start=1):
        try:
            ids.append(int(line.strip()))
        except ValueError:
            raise SourceError(
                f"devkit {VAL_GROUND_TRUTH}:{number}: expected an ILSVRC2012_ID, "
                f"got {line.strip()[:40]!r}"
            ) from None
    return ids


def _read_kaggle_csv(path: Path, text: str) -> dict[str, str]:
    rows = csv.reader(io.StringIO(text))
    next(rows)
    labels = {}
    for row in rows:
        if not row or not "".join(row).strip():
            continue
        prediction = row[1].split() if len(row) >= 2 else []
        if not prediction:
            raise SourceError(
                f"{path}:{rows.line_num}: no prediction for {row[0].strip()!r} "
                "(expected `ImageId,wnid x y x y ...`)"
            )
        labels[image_key(row[0].strip())] = prediction[0]
    return labels


def read_label_file(path: Path, classes: list[str]) -> dict[str, str]:
    """Image key -> wnid from Kaggle's LOC_val_solution.csv or a plain `filename label` file,
    where label is a wnid or a 0-based index in sorted-wnid order."""
    try:
        text = _text(path.read_bytes(), str(path))
    except OSError as err:
        raise SourceError(f"{path}: cannot read labels ({err.strerror or err})") from None
    if text.startswith("ImageId,PredictionString"):
        try:
            return _read_kaggle_csv(path, text)
        except csv.Error as err:
            raise SourceError(f"{path}: not a readable CSV ({err})") from None
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
                raise SourceError(
                    f"{path}:{number}: label {label} but {len(classes)} known classes"
                )
            label = sorted(classes)[int(label)]
        labels[image_key(name)] = label
    return labels


def read_synset_mapping(path: Path) -> dict[str, str]:
    """Kaggle's `LOC_synset_mapping.txt`: `n01440764 tench, Tinca tinca` per line."""
    names = {}
    try:
        text = _text(path.read_bytes(), str(path))
    except OSError as err:
        raise SourceError(f"{path}: cannot read ({err.strerror or err})") from None
    for line in text.splitlines():
        wnid, _, words = line.partition(" ")
        if re.fullmatch(r"n\d{8}", wnid):
            names[wnid] = words.strip()
    return names

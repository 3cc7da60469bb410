"""The same tiny ImageNet in each layout prep reads (prep.sample.mirrors writes the mirrors'
exact file layouts), plus the odd files the bad-input tests need."""

from __future__ import annotations

from pathlib import Path

from prep.imagenet_classes import imagenet_wnids
from prep.sample.mirrors import (  # noqa: F401 (the tests' one import for every layout)
    hf_label_metadata,
    tar_bytes,
    write_hf_parquet,
    write_hf_targz,
    write_official_train,
    write_parquet,
    write_timm_wds,
)
from tests.conftest import jpeg_bytes

CLASS_POSITIONS = (0, 7, 999)  # first, middle and last of the 1000: labels must say which
PER_CLASS = 4


def images() -> list[tuple[str, str, bytes]]:
    """(wnid, image id e.g. n01440764_3, JPEG bytes) in the official train order (sorted wnids)."""
    wnids = imagenet_wnids()
    out = []
    for c, position in enumerate(CLASS_POSITIONS):
        for i in range(PER_CLASS):
            wnid = wnids[position]
            out.append(
                (wnid, f"{wnid}_{i + 1}", jpeg_bytes(40 + 9 * i, 60 + 7 * c, seed=10 * c + i))
            )
    return out


def targz_bytes(members: list[tuple[str, bytes]]) -> bytes:
    import gzip

    return gzip.compress(tar_bytes(members), mtime=0)


def wds_tar(path: Path, samples: list[list[tuple[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes([member for sample in samples for member in sample]))
    return path


def write_generic_wds(src: Path, items) -> Path:
    """mydata-train-000.tar with the class folder in each key: <wnid>/<image id>.jpg."""
    return wds_tar(
        src / "mydata-train-000.tar",
        [[(f"{wnid}/{image_id}.jpg", data)] for wnid, image_id, data in items],
    )


def write_folders(src: Path, items) -> Path:
    for wnid, image_id, data in items:
        (src / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (src / "train" / wnid / f"{image_id}.jpg").write_bytes(data)
    return src

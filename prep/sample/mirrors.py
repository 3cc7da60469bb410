"""Images written in each mirror's exact file layout (prep.mirrors reads them): for tests,
benchmarks and trying a layout out without downloading it. Items are (wnid, image id, encoded
bytes), e.g. ("n01440764", "n01440764_10026", b"\\xff\\xd8..."), written in the order given."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Sequence

from prep.imagenet_classes import NUM_IMAGENET_CLASSES, imagenet_wnids

Item = tuple[str, str, bytes]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return plain.getvalue()


def _chunks(items: Sequence, num_files: int) -> list[Sequence]:
    per_file = -(-len(items) // num_files)
    return [items[i * per_file : (i + 1) * per_file] for i in range(num_files)]


def hf_label_metadata(names: Sequence[str] | None = None) -> dict:
    """The `huggingface` schema metadata HF's writer stores: the label's ClassLabel names."""
    names = (
        list(names) if names is not None else [f"class {i}" for i in range(NUM_IMAGENET_CLASSES)]
    )
    return {
        "info": {
            "features": {
                "image": {"_type": "Image"},
                "label": {"names": names, "_type": "ClassLabel"},
            }
        }
    }


def write_parquet(
    path: Path, rows: list[dict], row_group_rows: int = 100, metadata: dict | None = None
) -> Path:
    """Rows {"image": {"bytes", "path"}, "label"} as HF writes them (100-row row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("image", image_type), ("label", pa.int64())],
        metadata={b"huggingface": json.dumps(metadata or hf_label_metadata()).encode()},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_rows)
    return path


def write_hf_parquet(
    src: Path,
    items: Sequence[Item],
    split: str = "train",
    num_files: int = 2,
    row_group_rows: int = 100,
) -> list[Path]:
    """data/<split>-NNNNN-of-NNNNN.parquet; image.path as HF's script named the files."""
    labels = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
    rows = [
        {"image": {"bytes": data, "path": f"{image_id}_{wnid}.JPEG"}, "label": labels[wnid]}
        for wnid, image_id, data in items
    ]
    hf_split = {"train": "train", "val": "validation"}[split]
    return [
        write_parquet(
            src / "data" / f"{hf_split}-{i:05d}-of-{num_files:05d}.parquet",
            list(chunk),
            row_group_rows,
        )
        for i, chunk in enumerate(_chunks(rows, num_files))
    ]


def write_hf_targz(src: Path, items: Sequence[Item], num_files: int = 2) -> list[Path]:
    """data/train_images_{0..}.tar.gz, members <image id>_<wnid>.JPEG."""
    (src / "data").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(_chunks(items, num_files)):
        paths.append(src / "data" / f"train_images_{i}.tar.gz")
        members = [(f"{image_id}_{wnid}.JPEG", data) for wnid, image_id, data in chunk]
        paths[-1].write_bytes(gzip.compress(tar_bytes(members), mtime=0))
    return paths


def write_timm_wds(src: Path, items: Sequence[Item], num_shards: int = 2) -> list[Path]:
    """imagenet1k-train-NNNN.tar: <key>.jpg, <key>.cls, <key>.json per sample; _info.json beside."""
    labels = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
    src.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, chunk in enumerate(_chunks(items, num_shards)):
        members = []
        for wnid, image_id, data in chunk:
            members += [
                (f"{image_id}.jpg", data),
                (f"{image_id}.cls", b"%d" % labels[wnid]),
                (f"{image_id}.json", json.dumps({"filename": f"{image_id}.JPEG"}).encode()),
            ]
        paths.append(src / f"imagenet1k-train-{s:04d}.tar")
        paths[-1].write_bytes(tar_bytes(members))
    (src / "_info.json").write_text(
        json.dumps({"name": "imagenet-1k", "splits": {"train": {"num_samples": len(items)}}})
    )
    return paths


def write_official_train(src: Path, items: Sequence[Item]) -> Path:
    """ILSVRC2012_img_train.tar with all 1000 class tars (empty ones too: labels are the 1000's)."""
    by_class: dict[str, list[tuple[str, bytes]]] = {wnid: [] for wnid in imagenet_wnids()}
    for wnid, image_id, data in items:
        by_class[wnid].append((f"{image_id}.JPEG", data))
    src.mkdir(parents=True, exist_ok=True)
    path = src / "ILSVRC2012_img_train.tar"
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as outer:
            for wnid, members in by_class.items():
                _add(outer, f"{wnid}.tar", tar_bytes(members))
    return path


WRITERS = {
    "train-tar": write_official_train,
    "hf-parquet": write_hf_parquet,
    "hf-targz": write_hf_targz,
    "wds-imagenet1k": write_timm_wds,
}

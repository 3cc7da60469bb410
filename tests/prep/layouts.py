"""The same tiny ImageNet in each layout prep reads: the official train tar and the mirrors
(HF parquet, HF tar.gz, timm's WebDataset, generic WebDataset), written here in their exact
file layouts (tests/prep/test_mirrors.py says where each layout is documented)."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

from prep.imagenet_classes import imagenet_wnids
from tests.conftest import add_member, jpeg_bytes, write_train_tar

# (wnid, image id) in the official train order: sorted wnids, then archive order
CLASS_POSITIONS = (0, 7, 999)  # first, middle and last of the 1000: labels must say which
PER_CLASS = 4


def images() -> list[tuple[str, str, bytes]]:
    """(wnid, image id e.g. n01440764_3, JPEG bytes), some larger than the prep_size used."""
    wnids = imagenet_wnids()
    out = []
    for c, position in enumerate(CLASS_POSITIONS):
        for i in range(PER_CLASS):
            wnid = wnids[position]
            out.append((wnid, f"{wnid}_{i + 1}", jpeg_bytes(40 + 9 * i, 60 + 7 * c, seed=10 * c + i)))
    return out


def write_official(src: Path, items) -> Path:
    """ILSVRC2012_img_train.tar with all 1000 class tars (most empty), so labels are the 1000's."""
    src.mkdir(parents=True, exist_ok=True)
    by_class = {wnid: [] for wnid in imagenet_wnids()}
    for wnid, image_id, data in items:
        by_class[wnid].append((f"{image_id}.JPEG", data))
    return write_train_tar(src / "ILSVRC2012_img_train.tar", by_class)


def hf_metadata() -> dict:
    names = [f"class {i}" for i in range(1000)]
    return {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": names, "_type": "ClassLabel"}}}}


def write_parquet(path: Path, rows: list[dict], row_group_rows: int = 3, metadata: dict | None = None,
                  label_type=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("label", label_type or pa.int64())],
                       metadata={b"huggingface": json.dumps(hf_metadata() if metadata is None else metadata).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def write_hf_parquet(src: Path, items, split: str = "train", num_files: int = 2, row_group_rows: int = 3) -> list[Path]:
    """data/<split>-NNNNN-of-NNNNN.parquet, rows in order; image.path as the HF script wrote it."""
    wnids = imagenet_wnids()
    rows = [{"image": {"bytes": data, "path": f"{image_id}_{wnid}.JPEG"}, "label": wnids.index(wnid)}
            for wnid, image_id, data in items]
    per_file = -(-len(rows) // num_files)
    return [write_parquet(src / "data" / f"{split}-{i:05d}-of-{num_files:05d}.parquet",
                          rows[i * per_file:(i + 1) * per_file], row_group_rows) for i in range(num_files)]


def targz_bytes(members: list[tuple[str, bytes]]) -> bytes:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return gzip.compress(plain.getvalue(), mtime=0)


def write_hf_targz(src: Path, items, num_files: int = 2) -> list[Path]:
    """data/train_images_{0..}.tar.gz with members <image id>_<wnid>.JPEG."""
    (src / "data").mkdir(parents=True, exist_ok=True)
    per_file = -(-len(items) // num_files)
    paths = []
    for i in range(num_files):
        members = [(f"{image_id}_{wnid}.JPEG", data) for wnid, image_id, data in items[i * per_file:(i + 1) * per_file]]
        paths.append(src / "data" / f"train_images_{i}.tar.gz")
        paths[-1].write_bytes(targz_bytes(members))
    return paths


def wds_tar(path: Path, samples: list[list[tuple[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample:
                add_member(tar, name, data)
    return path


def write_timm_wds(src: Path, items, num_shards: int = 2) -> list[Path]:
    """imagenet1k-train-NNNN.tar: <key>.jpg, <key>.cls, <key>.json per sample; _info.json beside."""
    wnids = imagenet_wnids()
    per_shard = -(-len(items) // num_shards)
    paths = []
    for s in range(num_shards):
        samples = [[(f"{image_id}.jpg", data), (f"{image_id}.cls", b"%d" % wnids.index(wnid)),
                    (f"{image_id}.json", json.dumps({"filename": f"{image_id}.JPEG"}).encode())]
                   for wnid, image_id, data in items[s * per_shard:(s + 1) * per_shard]]
        paths.append(wds_tar(src / f"imagenet1k-train-{s:04d}.tar", samples))
    (src / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": {"train": {"num_samples": len(items)}}}))
    return paths


def write_generic_wds(src: Path, items) -> Path:
    """mydata-train-000.tar with the class folder in each key: <wnid>/<image id>.jpg."""
    return wds_tar(src / "mydata-train-000.tar", [[(f"{wnid}/{image_id}.jpg", data)] for wnid, image_id, data in items])


def write_folders(src: Path, items) -> Path:
    for wnid, image_id, data in items:
        (src / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (src / "train" / wnid / f"{image_id}.jpg").write_bytes(data)
    return src

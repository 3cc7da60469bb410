"""ImageNet as people download it today, recognised from its files in --src:

  hf-parquet      data/{train,validation}-*.parquet          Hugging Face ILSVRC/imagenet-1k (now)
  hf-targz        data/train_images_{0..4}.tar.gz, val_images.tar.gz   (its older revision)
  wds-imagenet1k  imagenet1k-{train,validation}-NNNN.tar     timm/imagenet-1k-wds
  wds             *train*.tar / *val*.tar WebDataset shards  (users' own)

`--src` may also be the HF cache's dataset directory (`datasets--ILSVRC--imagenet-1k`, whose
refs/main names the snapshot) or one of its `snapshots/<rev>` directories; files there are
symlinks into blobs/, followed as they are. None of these: None (the official layouts).
"""

from __future__ import annotations

import re
from pathlib import Path

from prep.hf_parquet import parquet_source
from prep.hf_targz import archives_for, targz_source
from prep.labels import SourceError
from prep.source_member import Source
from prep.wds_shards import generic_shards, generic_source, timm_shards, timm_source

HF_SPLITS = {"train": "train", "val": "validation"}


def snapshot_dir(src_dir: Path) -> Path:
    """The snapshot a HF cache dataset directory points at (src_dir itself otherwise)."""
    snapshots = src_dir / "snapshots"
    if not snapshots.is_dir():
        return src_dir
    ref = src_dir / "refs" / "main"
    if ref.is_file():
        chosen = snapshots / ref.read_text().strip()
        if chosen.is_dir():
            return chosen
    revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(revisions) == 1:
        return revisions[0]
    raise SourceError(
        f"{src_dir}: {len(revisions)} snapshots and no refs/main: pass one of "
        f"{snapshots}/<rev> as --src"
    )


def parquet_files(data_dir: Path, split: str) -> list[Path]:
    pattern = re.compile(rf"{HF_SPLITS[split]}-\d+-of-\d+\.parquet")
    return sorted(
        p for p in data_dir.glob("*.parquet") if pattern.fullmatch(p.name) and p.is_file()
    )


def open_mirror(src_dir: Path, split: str) -> Source | None:
    """The split from a mirror's files in src_dir (or its data/), or None when it has none."""
    root = snapshot_dir(src_dir)
    for data_dir in (root / "data", root):
        if not data_dir.is_dir():
            continue
        if files := parquet_files(data_dir, split):
            return parquet_source(split, files)
        if archives := archives_for(data_dir, split):
            return targz_source(split, archives)
        if shards := timm_shards(data_dir, split):
            return timm_source(split, shards)
        if shards := generic_shards(data_dir, split):
            return generic_source(split, shards)
    return None

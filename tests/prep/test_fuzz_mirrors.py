"""Time-bounded fuzzing of the mirror readers: mutated tar.gz streams, parquet files and WebDataset
shards go through the source readers; every case ends in members (each an image to try or a listed
reject) or one SourceError, within its time limit (tests.fuzz: a hang is a failure, and the failing
seed is named). `python -m tests.prep.test_fuzz_mirrors 60` (or tests.fuzz) hunts longer."""

from __future__ import annotations

import functools
import itertools
import random
import sys
import tempfile
from pathlib import Path

import pytest

from prep.hf_parquet import parquet_source
from prep.hf_targz import targz_source
from prep.labels import SourceError
from prep.source_member import SourceMember
from prep.wds_shards import timm_source
from tests.fuzz import fix_tar_checksums, mutate, run_cases
from tests.prep import layouts
from tests.prep.layouts import jpeg_bytes

BUDGET_S = 2.0


@functools.lru_cache(maxsize=1)
def valid_inputs() -> dict[str, bytes]:
    items = [(w, i, jpeg_bytes(12, 14, seed=n)) for n, (w, i, _) in enumerate(layouts.images()[:5])]
    with tempfile.TemporaryDirectory() as tmp:
        [parquet] = layouts.write_hf_parquet(Path(tmp), items, num_files=1, row_group_rows=2)
        [shard] = layouts.write_timm_wds(Path(tmp), items, num_shards=1)
        return {
            "targz": layouts.targz_bytes([(f"{i}_{w}.JPEG", d) for w, i, d in items]),
            "parquet": parquet.read_bytes(),
            "wds": shard.read_bytes(),
        }


def read_all(kind: str, path: Path) -> int:
    """Every member the reader yields from one file; SourceError is the allowed failure."""
    opened = {
        "targz": lambda: targz_source("train", [path]),
        "parquet": lambda: parquet_source("train", [path]),
        "wds": lambda: timm_source("train", [path]),
    }[kind]
    try:
        source = opened()
        count = 0
        for member in source.members():
            assert isinstance(member, SourceMember)
            assert member.reject or member.data is not None or member.nbytes >= 0
            count += 1
        if source.listing is not None:
            list(source.listing())
        return count
    except SourceError as err:
        assert "\n" not in str(err)
        return -1


def check_case(kind: str, directory: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = mutate(valid_inputs()[kind], rng, protect=rng.choice((0, 2, 10)))
    if kind == "wds":
        data = fix_tar_checksums(data)
    name = {
        "targz": "train_images_0.tar.gz",
        "parquet": "train-00000-of-00001.parquet",
        "wds": "imagenet1k-train-0000.tar",
    }[kind]
    path = directory / name
    path.write_bytes(data)
    try:
        read_all(kind, path)
    except AssertionError:
        raise
    except BaseException as err:  # anything else (a traceback for the user) names the seed
        raise AssertionError(f"{kind} seed {seed}: {type(err).__name__}: {err}") from err


def fuzz(kind: str, seconds: float, directory: Path) -> int:
    return run_cases(itertools.count(), seconds, functools.partial(check_case, kind, directory))


def test_valid_inputs_read_whole(tmp_path):
    for kind, data in valid_inputs().items():
        path = tmp_path / kind
        path.write_bytes(data)
        assert read_all(kind, path) == 5, kind


# slow: the quick tier covers the readers on valid and chosen bad inputs (above, and
# test_mirror_bad_input)
@pytest.mark.slow
def test_fuzz_gzip_reader(tmp_path):
    assert fuzz("targz", BUDGET_S, tmp_path) > 20


@pytest.mark.slow
def test_fuzz_parquet_reader(tmp_path):
    assert fuzz("parquet", BUDGET_S, tmp_path) > 20


@pytest.mark.slow
def test_fuzz_webdataset_reader(tmp_path):
    assert fuzz("wds", BUDGET_S, tmp_path) > 20


def fuzz_all(seconds: float) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        return {kind: fuzz(kind, seconds / 3, Path(tmp)) for kind in ("targz", "parquet", "wds")}


if __name__ == "__main__":  # hunt for longer: python -m tests.prep.test_fuzz_mirrors 60
    print(fuzz_all(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0), "cases")

"""prep build --num-parts/--part-index + prep merge: the parts of a build joined equal a single
build of the same source (records, order, keys, records.npy, names.txt, manifest; msgpack shards
byte for byte); mismatched, gapped or overlapping parts are refused with one line; parts and
merges resume; under torchrun each rank builds its part and rank 0 merges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from formats.manifest import read_manifest
from formats.msgpack_store import DEFAULT_SHARD_BYTES, MsgpackWriter
from prep.build import BuildConfig, build
from prep.cli import app
from prep.lock import LockedError, lock_path, locked
from prep.merge import merge
from prep.partial import BuildError
from prep.parts import PartSpec, byte_range, part_source
from prep.sample import write_sample
from prep.sources import open_source
from prep.verify import verify
from tests.prep.test_build import dataset_bytes

REPO = Path(__file__).resolve().parents[2]
SIZES = (96, 48)
SHARD_BYTES = 24 << 10  # small shards, so shard boundaries fall inside parts and between them


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """4 classes x 9 train images with the grayscale, CMYK and PNG quirks (36 members)."""
    src = tmp_path_factory.mktemp("parts_src")
    write_sample(src, num_classes=4, train_per_class=9, val_per_class=3, seed=3)
    return src


def config(
    src: Path, out: Path, store: str, part: PartSpec | None = None, **changes
) -> BuildConfig:
    fields = dict(
        src_dir=src,
        out_dir=out,
        split="train",
        prep_sizes=SIZES,
        store=store,
        workers=0,
        quiet=True,
        shard_bytes=SHARD_BYTES,
        commit_every=4,
        part=part,
    )
    return BuildConfig(**{**fields, **changes})


def build_parts(src: Path, out: Path, store: str, num_parts: int, **changes) -> list[Path]:
    for index in range(num_parts):
        build(config(src, out, store, PartSpec(index, num_parts), **changes))
    return sorted(out.glob(f"train-{SIZES[0]}.part-*"))


def assert_same_dataset(single: Path, merged: Path) -> None:
    """Equal to a single build: every file byte for byte, except LMDB's data.mdb, whose page
    layout depends on its write history; its content digest sits in the (equal) manifest."""
    assert (merged / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    for name in read_manifest(single).files:
        if name != "data.mdb":
            assert (merged / name).read_bytes() == (single / name).read_bytes(), name
    assert dataset_bytes(merged) == dataset_bytes(single)
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in single.iterdir())
    report = verify(merged, workers=1, quiet=True)
    assert report.ok, report.faults


def test_byte_ranges_tile_the_source():
    for total in (5, 36, 147_000_000_000):
        for num_parts in (1, 2, 3, 7):
            ranges = [byte_range(total, PartSpec(i, num_parts)) for i in range(num_parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


@pytest.mark.parametrize("num_parts", [1, 2, 5, 36, 50])
def test_parts_hold_every_member_once_in_order(src, num_parts):
    source = open_source(src, "train")
    names = [m.name for m in source.members()]
    parts = [
        [m.name for m in part_source(source, PartSpec(i, num_parts), None)[0].members()]
        for i in range(num_parts)
    ]
    assert [name for part in parts for name in part] == names
    if num_parts <= 5:  # balanced by bytes: no part is empty while there are members to spare
        assert all(parts)


def test_a_part_reads_no_class_tar_outside_its_range(src, monkeypatch):
    """Skipping whole class tars: part 3 of 4 reads the headers of at most two of them."""
    from prep import sources

    source = open_source(src, "train")
    scanned = []
    original = sources._tar_files
    monkeypatch.setattr(
        sources, "_tar_files", lambda fd, name, *a: scanned.append(name) or original(fd, name, *a)
    )
    list(part_source(source, PartSpec(3, 4), None)[0].members())
    assert 1 <= len(scanned) <= 2 and all(name.endswith(".tar") for name in scanned)


@pytest.mark.parametrize("store", ["lmdb", "msgpack"])
def test_parts_merged_equal_a_single_build(src, tmp_path, store):
    build(config(src, tmp_path / "single", store))
    part_dirs = build_parts(src, tmp_path / "parts", store, 3)
    assert [p.name for p in part_dirs] == [f"train-96.part-{i}-of-3" for i in range(3)]
    assert all(verify(p, workers=1, quiet=True).ok for p in part_dirs)  # a part is a dataset too
    for size in SIZES:
        parts = sorted((tmp_path / "parts").glob(f"train-{size}.part-*"))
        # any order on the command line
        summary = merge(parts[::-1], tmp_path / "merged", quiet=True)
        assert summary.num_parts == 3
        assert_same_dataset(
            tmp_path / "single" / f"train-{size}", tmp_path / "merged" / f"train-{size}"
        )
    manifest = read_manifest(tmp_path / "merged" / "train-96")
    assert "part" not in manifest.build and len(manifest.conversions) == 3
    if store == "msgpack":  # the shard boundaries fell inside the parts, not only between them
        assert len([n for n in manifest.files if n.startswith("shard-")]) > 3


def test_more_parts_than_members_merge_too(sample_src, tmp_path):
    """15 parts of the 12-image val tar: some parts hold no member at all, and still merge."""
    src, _ = sample_src
    single = build(
        BuildConfig(src, tmp_path / "single", "val", (64,), "msgpack", workers=0, quiet=True)
    )
    for index in range(15):
        build(
            BuildConfig(
                src,
                tmp_path / "parts",
                "val",
                (64,),
                "msgpack",
                workers=0,
                quiet=True,
                part=PartSpec(index, 15),
            )
        )
    counts = [read_manifest(p).count for p in sorted((tmp_path / "parts").glob("val-64.part-*"))]
    assert 0 in counts and sum(counts) == single.manifests[64].count == 12
    merge(list((tmp_path / "parts").glob("val-64.part-*")), tmp_path / "merged", quiet=True)
    assert_same_dataset(tmp_path / "single" / "val-64", tmp_path / "merged" / "val-64")


def test_cli_parts_and_merge(src, tmp_path):
    out = tmp_path / "out"
    for index in range(2):
        result = CliRunner().invoke(
            app,
            [
                "build-lmdb",
                "--src",
                str(src),
                "--out",
                str(out),
                "--size",
                "48",
                "--workers",
                "0",
                "--num-parts",
                "2",
                "--part-index",
                str(index),
                "-q",
            ],
        )
        assert result.exit_code == 0, result.output
        assert f"train-48.part-{index}-of-2: built: " in result.stdout
    result = CliRunner().invoke(
        app, ["merge", *map(str, out.glob("train-48.part-*")), "--out", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "train-48: merged from 2 parts" in result.stdout
        and read_manifest(out / "train-48").count == 36
    )
    again = CliRunner().invoke(
        app, ["merge", *map(str, out.glob("train-48.part-*")), "--out", str(out), "-q"]
    )
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.stderr


@pytest.fixture(scope="module")
def two_parts(src, tmp_path_factory) -> dict[str, Path]:
    """Parts of one build (2 of 2 at 48 px and 96 px), and parts of other builds to mix in."""
    out = tmp_path_factory.mktemp("refusals")
    build_parts(src, out / "a", "lmdb", 2, prep_sizes=(48,))
    build_parts(src, out / "b", "lmdb", 2)
    build_parts(src, out / "q80", "lmdb", 2, quality=80, prep_sizes=(48,))
    build_parts(src, out / "three", "lmdb", 3, prep_sizes=(48,))
    build_parts(src, out / "msgpack", "msgpack", 2, prep_sizes=(48,))
    other = out / "other_src"
    write_sample(other, num_classes=4, train_per_class=9, val_per_class=3, seed=4)
    build_parts(other, out / "other", "lmdb", 2, prep_sizes=(48,))
    build(config(src, out / "whole", "lmdb", prep_sizes=(48,)))
    return {"root": out}


@pytest.mark.parametrize(
    "given, message",
    [
        (["a/train-48.part-0-of-2"], "gap: part(s) 1 of 2 missing"),
        (
            ["a/train-48.part-0-of-2", "a/train-48.part-0-of-2", "a/train-48.part-1-of-2"],
            "overlap: part 0 of 2 given twice",
        ),
        (["a/train-48.part-0-of-2", "other/train-48.part-1-of-2"], "source"),
        (["a/train-48.part-0-of-2", "b/train-96.part-1-of-2"], "prep_size 96 differs"),
        (
            ["a/train-48.part-0-of-2", "b/train-48.part-1-of-2"],
            "other tool/codec versions or sizes",
        ),
        (["a/train-48.part-0-of-2", "q80/train-48.part-1-of-2"], "quality 80 differs"),
        (["a/train-48.part-0-of-2", "three/train-48.part-1-of-3"], "num_parts 3 differs"),
        (["a/train-48.part-0-of-2", "msgpack/train-48.part-1-of-2"], "store 'msgpack' differs"),
        (["a/train-48.part-0-of-2", "whole/train-48"], "not a part"),
        (["a/train-48.part-0-of-2", "a/nothing"], "no such dataset directory"),
    ],
)
def test_merge_refuses_parts_that_are_not_one_build(two_parts, tmp_path, given, message):
    root = two_parts["root"]
    result = CliRunner().invoke(
        app, ["merge", *(str(root / g) for g in given), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prep: error:") and message in lines[0], (
        result.stderr
    )
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def _tampered(part: Path, target: Path, change) -> Path:
    """A copy of `part` whose manifest was edited by `change(dict)`."""
    import shutil

    shutil.copytree(part, target)
    manifest = json.loads((target / "manifest.json").read_text())
    change(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["build"].update(tool_version="9.9"), "other tool/codec versions"),
        (lambda m: m.update(format_version=99), "format_version 99"),
        (
            lambda m: m["build"]["part"].update(
                bytes=[m["build"]["part"]["bytes"][0] - 1, m["build"]["part"]["bytes"][1]]
            ),
            "overlap: ",
        ),
        (
            lambda m: m["build"]["part"].update(
                bytes=[m["build"]["part"]["bytes"][0] + 1, m["build"]["part"]["bytes"][1]]
            ),
            "gap: ",
        ),
        (lambda m: m["build"]["part"].update(num_members=5), "but the part read 5 members"),
    ],
)
def test_merge_refuses_other_versions_and_bad_ranges(two_parts, tmp_path, change, message):
    root = two_parts["root"]
    tampered = _tampered(root / "a" / "train-48.part-1-of-2", tmp_path / "tampered", change)
    result = CliRunner().invoke(
        app,
        [
            "merge",
            str(root / "a" / "train-48.part-0-of-2"),
            str(tampered),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_merge_refuses_parts_of_an_older_format_version(two_parts, tmp_path):
    """Version 1 wrote names.txt raw: its lines cannot go into a dataset whose manifest says 2."""
    root = two_parts["root"]
    old = [
        _tampered(
            root / "a" / f"train-48.part-{i}-of-2",
            tmp_path / f"v1-{i}",
            lambda m: m.update(format_version=1),
        )
        for i in range(2)
    ]
    result = CliRunner().invoke(app, ["merge", *map(str, old), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "format_version 1, this prep writes 2: rebuild the parts" in lines[0]
    ), result.stderr


def test_merge_takes_the_outputs_lock_and_a_part_its_own(src, tmp_path):
    build_parts(src, tmp_path / "parts", "lmdb", 2, prep_sizes=(48,))
    parts = sorted((tmp_path / "parts").glob("train-48.part-*"))
    out = tmp_path / "merged"
    out.mkdir()
    with locked([(lock_path(out, "train-48"), "train-48")]):  # a build (or merge) writing train-48
        with pytest.raises(LockedError, match=f"PID {os.getpid()}"):
            merge(parts, out, quiet=True)
        assert not (out / "train-48").exists()
    assert merge(parts, out, quiet=True).manifest.count == 36
    # the ranks of one build write to one --out: each part locks only itself
    (tmp_path / "again").mkdir()
    with locked([(lock_path(tmp_path / "again", "train-48"), "train-48")]):
        build(config(src, tmp_path / "again", "lmdb", PartSpec(0, 2), prep_sizes=(48,)))
        with locked([(lock_path(tmp_path / "again", "train-48.part-1-of-2"), "part 1")]):
            with pytest.raises(LockedError):
                build(config(src, tmp_path / "again", "lmdb", PartSpec(1, 2), prep_sizes=(48,)))


def test_parts_do_not_warn_of_the_classes_other_parts_hold(src, tmp_path):
    """A part holds some classes only; whether a class is empty is for the merged dataset to say."""
    args = [
        "build-lmdb",
        "--src",
        str(src),
        "--out",
        str(tmp_path),
        "--size",
        "48",
        "--workers",
        "0",
        "-q",
    ]
    for index in range(2):
        result = CliRunner().invoke(app, [*args, "--num-parts", "2", "--part-index", str(index)])
        assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
    result = CliRunner().invoke(
        app, ["merge", *map(str, sorted(tmp_path.glob("train-48.part-*"))), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
    assert read_manifest(tmp_path / "train-48").counts_per_class == [9, 9, 9, 9]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-parts", "3"], "--num-parts and --part-index go together"),
        (
            ["--num-parts", "3", "--part-index", "3"],
            "need num-parts >= 1 and 0 <= part-index < num-parts",
        ),
        (["--num-parts", "0", "--part-index", "0"], "need num-parts >= 1"),
    ],
)
def test_bad_part_arguments_are_one_line(src, tmp_path, args, message):
    result = CliRunner().invoke(
        app,
        [
            "build-lmdb",
            "--src",
            str(src),
            "--out",
            str(tmp_path),
            "--size",
            "48",
            "--workers",
            "0",
            *args,
        ],
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_interrupted_part_and_merge_resume_to_a_single_build(src, tmp_path, monkeypatch):
    build(config(src, tmp_path / "single", "msgpack"))
    original, calls = MsgpackWriter.append, {"n": 0}

    def fail_after(limit):
        def append(self, index, label, jpeg):
            calls["n"] += 1
            if calls["n"] > limit:
                raise OSError(28, "No space left on device", str(self.dataset_dir))
            return original(self, index, label, jpeg)

        calls["n"] = 0
        monkeypatch.setattr(MsgpackWriter, "append", append)

    first = config(src, tmp_path / "parts", "msgpack", PartSpec(0, 2))
    assert len(list(part_source(open_source(src, "train"), first.part, None)[0].members())) > 17
    # part 0 (2 outputs) dies in its 2nd chunk, after committing the 1st (16 members)
    fail_after(34)
    with pytest.raises(BuildError, match="rerun the same command to resume"):
        build(first)
    monkeypatch.setattr(MsgpackWriter, "append", original)
    assert build(first).resumed_from == 16
    build(config(src, tmp_path / "parts", "msgpack", PartSpec(1, 2)))
    parts = sorted((tmp_path / "parts").glob("train-96.part-*"))
    fail_after(20)  # the merge dies part-way too
    with pytest.raises(BuildError, match="unfinished merge"):
        merge(parts, tmp_path / "merged", quiet=True, commit_every=5)
    monkeypatch.setattr(MsgpackWriter, "append", original)
    assert merge(parts, tmp_path / "merged", quiet=True, commit_every=5).resumed_from == 20
    assert_same_dataset(tmp_path / "single" / "train-96", tmp_path / "merged" / "train-96")


def test_torchrun_without_torch_is_one_line(src, tmp_path):
    """WORLD_SIZE/RANK set but torch not importable: one line, exit 1, nothing built."""
    blocker = (
        "import sys\nclass Block:\n def find_spec(self, name, *a):\n"
        "  if name.split('.')[0] == 'torch': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\nfrom prep.cli import app\nsys.exit(app())\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            blocker,
            "build-lmdb",
            "--src",
            str(src),
            "--out",
            str(tmp_path),
            "--size",
            "48",
            "--workers",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs torch" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_world_size_without_torchrun_is_one_line(src, tmp_path):
    """WORLD_SIZE/RANK exported by something else, no MASTER_ADDR: one line, nothing built."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prep.cli",
            "build-lmdb",
            "--src",
            str(src),
            "--out",
            str(tmp_path),
            "--size",
            "48",
            "--workers",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**env, "WORLD_SIZE": "2", "RANK": "1"},
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "joining the ranks failed" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_torchrun_two_ranks_build_and_merge_a_single_build(src, tmp_path, store="msgpack"):
    build(config(src, tmp_path / "single", store, shard_bytes=DEFAULT_SHARD_BYTES))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "prep.cli",
        f"build-{store}",
        "--src",
        str(src),
        "--out",
        str(tmp_path / "ddp"),
        "--size",
        "96",
        "--size",
        "48",
        "--workers",
        "1",
        "--commit-every",
        "4",
        "-q",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[rank 1] " in result.stdout and "train-96: merged from 2 parts" in result.stdout
    for size in SIZES:
        assert_same_dataset(
            tmp_path / "single" / f"train-{size}", tmp_path / "ddp" / f"train-{size}"
        )
    # parts removed
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["train-48", "train-96"]
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    # nothing rebuilt or re-merged
    assert again.returncode == 0 and "exists, not rebuilt" in again.stdout

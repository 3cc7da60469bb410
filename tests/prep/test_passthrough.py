"""Reuse what is already right, and say what was changed: a baseline RGB JPEG already at its
stored size is kept byte for byte (unless --reencode); every converted input is listed in the
manifest and the summary with what was done; a folder source of more files than the process may
open builds cleanly; rejects and conversions are journalled, not rewritten at every commit."""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from formats import jpeg
from formats.manifest import read_manifest
from prep.build import BuildConfig, build
from prep.cli import app
from prep.resize import prepare_image
from tests.conftest import jpeg_bytes
from tests.prep.test_build import dataset_bytes

REPO = Path(__file__).resolve().parents[2]


def progressive_jpeg(height: int, width: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(height, width))).save(
        out, "JPEG", quality=90, progressive=True
    )
    return out.getvalue()


def image_file(mode: str, height: int = 120, width: int = 200, fmt: str = "PNG") -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
    image = Image.fromarray(rgb)
    image = image.convert("P") if mode == "P" else image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_is_sequential_8bit_reads_only_the_frame_header():
    assert jpeg.is_sequential_8bit(jpeg_bytes(50, 60))
    assert not jpeg.is_sequential_8bit(progressive_jpeg(50, 60))
    for data in (b"", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", b"not a jpeg", image_file("RGB")):
        assert not jpeg.is_sequential_8bit(data)


@pytest.mark.parametrize(
    "height, width, sizes",
    [
        (160, 213, (160,)),  # shorter side already = prep_size (fast.ai's sz/160 copies)
        (100, 140, (160,)),  # small original, kept as it is
        (160, 213, (160, 320)),  # at size for one output, small for the other
    ],
)
def test_jpeg_already_at_size_is_kept_byte_for_byte(height, width, sizes):
    data = jpeg_bytes(height, width, seed=5)
    prepared = prepare_image(data, sizes, 90)
    assert all(o.jpeg == data and o.stored_as_is for o in prepared.outputs)
    assert prepared.conversion is None
    again = prepare_image(data, sizes, 90, reencode=True)
    assert all(o.jpeg != data and not o.stored_as_is for o in again.outputs)
    assert [(o.height, o.width) for o in again.outputs] == [
        (o.height, o.width) for o in prepared.outputs
    ]


def test_only_outputs_at_the_original_size_are_kept():
    data = jpeg_bytes(320, 427, seed=6)
    small, same = prepare_image(data, (160, 320), 90).outputs
    assert (small.height, small.width, small.stored_as_is) == (160, 214, False)
    assert same.jpeg == data and same.stored_as_is


@pytest.mark.parametrize(
    "data",
    [progressive_jpeg(160, 213), jpeg_bytes(160, 213, mode="L"), jpeg_bytes(160, 213, mode="CMYK")],
    ids=["progressive", "gray", "cmyk"],
)
def test_progressive_and_non_rgb_jpegs_at_size_are_reencoded(data):
    output = prepare_image(data, (160,), 90).outputs[0]
    assert output.jpeg != data and not output.stored_as_is
    assert (
        jpeg.is_sequential_8bit(output.jpeg) and Image.open(io.BytesIO(output.jpeg)).mode == "RGB"
    )


def test_truncated_jpeg_at_size_is_rejected_not_stored():
    data = jpeg_bytes(160, 213)
    with pytest.raises(Exception, match="undecodable jpeg"):
        prepare_image(data[: len(data) * 2 // 3], (160,), 90)


@pytest.mark.parametrize(
    "data, conversion",
    [
        (jpeg_bytes(200, 300, mode="CMYK"), "JPEG CMYK -> RGB JPEG"),
        (jpeg_bytes(200, 300, mode="L"), "JPEG grayscale -> RGB JPEG"),
        (image_file("RGB"), "PNG -> JPEG"),
        (image_file("RGBA"), "PNG RGBA -> RGB JPEG (alpha composited over white)"),
        (image_file("P", fmt="GIF"), "GIF palette -> RGB JPEG"),
        (image_file("L", fmt="BMP"), "BMP grayscale -> RGB JPEG"),
        (jpeg_bytes(200, 300), None),
    ],
)
def test_each_conversion_says_what_was_done(data, conversion):
    assert prepare_image(data, (100,), 90).conversion == conversion


def test_jpeg_whose_sampling_libjpeg_turbo_cannot_name_is_converted_not_rejected():
    """PIL's CMYK JPEG with subsampling=2 samples only C at half size: tjDecompressHeader3 fails
    ("Could not determine subsampling type"), libjpeg decodes it. Found by bench/scale.py."""
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(200, 300))).convert("CMYK").save(
        out, "JPEG", quality=80, subsampling=2
    )
    prepared = prepare_image(out.getvalue(), (100,), 90)
    assert prepared.conversion == "JPEG CMYK -> RGB JPEG" and prepared.outputs[0].height == 100


def write_folder_source(root: Path, files: dict[str, bytes]) -> Path:
    """`train/<class>/<name>` files: a folder layout such as fast.ai's imagenet-sz/160."""
    for relative, data in files.items():
        path = root / "train" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_sz160_folders_are_stored_byte_for_byte_unless_reencode(tmp_path):
    files = {
        f"n0{c}/n0{c}_{i}.JPEG": jpeg_bytes(160, 200 + 10 * i, seed=10 * c + i)
        for c in range(2)
        for i in range(4)
    }
    files["n00/n00_big.JPEG"] = jpeg_bytes(320, 427, seed=99)  # needs a resize: re-encoded
    src = write_folder_source(tmp_path / "sz160", files)
    summary = build(
        BuildConfig(src, tmp_path / "out", "train", (160,), "lmdb", workers=0, quiet=True)
    )
    stored, names = dataset_bytes(tmp_path / "out" / "train-160"), sorted(files)
    by_name = dict(zip(names, stored))
    assert all(by_name[n] == files[n] for n in names if "big" not in n)
    assert by_name["n00/n00_big.JPEG"] != files["n00/n00_big.JPEG"]
    manifest = summary.manifests[160]
    assert manifest.build["num_stored_as_is"] == 8 and manifest.build["reencode_all"] is False
    again = build(
        BuildConfig(
            src, tmp_path / "again", "train", (160,), "lmdb", workers=0, quiet=True, reencode=True
        )
    )
    assert again.manifests[160].build["num_stored_as_is"] == 0
    assert not set(dataset_bytes(tmp_path / "again" / "train-160")) & set(files.values())


def test_converted_inputs_are_listed_in_manifest_summary_and_info(sample_src, tmp_path):
    src, info = sample_src
    result = CliRunner().invoke(
        app,
        [
            "build-msgpack",
            "--src",
            str(src),
            "--out",
            str(tmp_path),
            "--size",
            "64",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "train-64")
    listed = {c["name"]: c["conversion"] for c in manifest.conversions}
    assert listed == {
        info.gray_train_name: "JPEG grayscale -> RGB JPEG",
        info.cmyk_train_name: "JPEG CMYK -> RGB JPEG",
        info.png_train_name: "PNG -> JPEG",
    }
    assert "3 converted" in result.stdout
    assert f"converted {info.cmyk_train_name}: JPEG CMYK -> RGB JPEG" in result.stdout
    shown = CliRunner().invoke(app, ["info", str(tmp_path / "train-64")])
    assert "converted 3" in shown.stdout and info.png_train_name in shown.stdout
    as_json = json.loads(
        CliRunner().invoke(app, ["info", str(tmp_path / "train-64"), "--json"]).stdout
    )
    assert as_json["conversions"] == manifest.conversions


def test_manifest_written_before_conversions_existed_still_reads(built_shards, tmp_path):
    import shutil

    dataset = tmp_path / "old"
    shutil.copytree(built_shards / "lmdb" / "val-160", dataset)
    raw = json.loads((dataset / "manifest.json").read_text())
    del raw["conversions"]
    (dataset / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(dataset).conversions == []


def test_folder_source_larger_than_the_open_file_limit(tmp_path):
    """Each worker used to keep every file it read open: past `ulimit -n` files, every image
    was rejected with 'Too many open files'."""
    data = jpeg_bytes(180, 240)
    src = write_folder_source(
        tmp_path / "many", {f"n0{c}/n0{c}_{i}.JPEG": data for c in range(2) for i in range(60)}
    )
    limit = 64

    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prep.cli",
            "build-lmdb",
            "--src",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "96",
            "--workers",
            "1",
            "-q",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=lower_limit,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "out" / "train-96")
    assert manifest.count == 120 and manifest.rejects == []


def test_rejects_and_conversions_are_journalled_not_rewritten(tmp_path, monkeypatch):
    """progress.json must not carry the lists: rewriting them at every commit costs time
    quadratic in their number. They sit in append-only files and survive a resume."""
    from formats.msgpack_store import MsgpackWriter
    from prep import partial
    from prep.partial import BuildError

    members = {f"n01/{i:02d}_bad.JPEG": b"not an image" for i in range(30)}
    members.update(
        {f"n01/{i:02d}_gray.JPEG": jpeg_bytes(100, 120, mode="L", seed=i) for i in range(30)}
    )
    src = write_folder_source(tmp_path / "src", members)
    whole = build(
        BuildConfig(src, tmp_path / "whole", "train", (64,), "msgpack", workers=0, quiet=True)
    ).manifests[64]
    assert len(whole.rejects) == 30 and len(whole.conversions) == 30
    sizes, original_commit, original_append = [], partial.PartialOutput.commit, MsgpackWriter.append

    def commit(self, progress):
        original_commit(self, progress)
        saved = json.loads((self.partial_dir / partial.PROGRESS_FILE).read_text())
        sizes.append(len(json.dumps(saved)))
        assert "rejects" not in saved and "conversions" not in saved

    def append(self, index, label, data):
        if index >= 20:
            raise OSError(28, "No space left on device", str(self.dataset_dir))
        original_append(self, index, label, data)

    monkeypatch.setattr(partial.PartialOutput, "commit", commit)
    monkeypatch.setattr(MsgpackWriter, "append", append)
    config = BuildConfig(
        src, tmp_path / "out", "train", (64,), "msgpack", workers=0, quiet=True, commit_every=1
    )
    with pytest.raises(BuildError):
        build(config)
    monkeypatch.setattr(MsgpackWriter, "append", original_append)
    resumed = build(config)
    assert resumed.resumed_from > 0
    assert (tmp_path / "out" / "train-64" / "manifest.json").read_bytes() == (
        tmp_path / "whole" / "train-64" / "manifest.json"
    ).read_bytes()
    assert max(sizes) - min(sizes) < 100  # progress.json stays the same size however many entries


def test_saving_progress_does_not_copy_the_lists():
    """Found by bench/scale.py: dataclasses.asdict deep-copied 19,000 conversions at each of
    1,281 commits (throughput fell with the build's age). Copying 100,000 of them 10 times here
    takes ~10 s; saving progress must not touch them."""
    import time

    from prep.partial import Progress

    progress = Progress(
        {"k": 1}, conversions=[{"name": f"n{i}", "conversion": "x"} for i in range(100_000)]
    )
    started = time.perf_counter()
    for _ in range(10):
        saved = progress.saved_fields()
    assert time.perf_counter() - started < 0.5
    assert "conversions" not in saved and saved["fingerprint"] == {"k": 1}

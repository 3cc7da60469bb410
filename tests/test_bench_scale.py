"""bench/scale.py in tiny mode (--scale 0.001: ImageNet's layout with 1,000 class tars of one
image each): every step runs and records what it measured, the archive has ImageNet's exact
layout, the 2-rank torchrun build + merge equals the single build, and the report says so. The
projection arithmetic is checked on hand-made numbers."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prep.sources import open_source

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # after the repo root: bench/prep.py must not shadow the prep package


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = tmp_path_factory.mktemp("scale")
    # synthetic photos: the test needs the layout and the steps, not realistic decode costs
    result = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--data", str(data), "--scale", "0.001",
                             "--photos", "synthetic", "--workers", "1", "all"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return data, json.loads((data / "results.json").read_text()), result.stdout


@pytest.mark.slow
def test_archive_has_imagenets_layout(tiny):
    data, results, _ = tiny
    generated = results["generate"]
    assert generated["num_classes"] == 1000 and generated["train_images"] == 1000 and generated["val_images"] == 50
    assert generated["train_cmyk"] == 1 and generated["train_png"] == 1
    train, val = open_source(data / "src", "train"), open_source(data / "src", "val")
    assert train.layout == "train-tar" and len(train.classes) == 1000 and val.classes == train.classes
    val_members = list(val.members())
    assert [m.name for m in val_members] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 51)]
    assert all(0 <= m.label < 1000 for m in val_members)  # every val image labelled through the devkit


@pytest.mark.slow
def test_every_step_measured_and_parts_equal_the_single_build(tiny):
    _, results, stdout = tiny
    prep = results["prep"]
    for split, members in (("train", 1000), ("val", 50)):
        assert prep[split]["members"] == members == prep[split]["records"] + prep[split]["rejects"]
        assert 0 < prep[split]["peak_rss_mib"] < 1024 and prep[split]["peak_fds"] > 0
    assert prep["train"]["conversions"] >= 2  # the CMYK and the PNG at least
    assert results["verify"]["train"]["ok"] and results["verify"]["val"]["ok"]
    profile = results["profile"]  # one part of 20, cut by bytes: about a 20th of the members
    assert abs(profile["part_bytes"] - profile["source_bytes"] / 20) <= 1 and 25 <= profile["members"] <= 100
    assert profile["top_tottime"]
    train = results["train"]
    assert set(train["sampler_plan_s"]) == {"1", "8", "64"} and train["num_val_records"] == 50
    assert train["train_loader"]["batch_shape"][1:] == [3, 128, 128] and train["dry_run_s"] > 0
    parts = results["parts"]
    assert all(parts["identical_files"].values()) and parts["verify_ok"] and len(parts["rank_build_s"]) == 2
    assert "identical to the single build: True" in stdout and "prep verify: OK" in stdout


def test_projection_takes_the_slower_of_spread_work_and_the_main_process():
    report = importlib.import_module("scale_report")
    # workers 1 ms/img + main 0.05 ms over 16 cores = 0.066 ms/img > 0.05: the cores bound it
    assert report.project_seconds(16_000, 1.0, 0.05, cores=16) == pytest.approx(16_000 * 1.05 / 16 / 1e3)
    # main 0.2 ms/img alone exceeds (0.5 + 0.2) / 16: the main process bounds it
    assert report.project_seconds(10_000, 0.5, 0.2, cores=16) == pytest.approx(2.0)
    results = {"prep": {"train": {"main_cpu_ms_per_image": 0.05}, "val 160+320": {"main_cpu_ms_per_image": 0.08}}}
    bench = {"img_per_s_runs": [{"prep 160 w1": r, "prep 320 w1": r / 2, "prep 160+320 w1": r / 2.2}
                                for r in (900.0, 1000.0, 1100.0)]}
    lines = report.format_report(results, bench).splitlines()
    sz160 = next(line for line in lines if line.strip().startswith("sz/160 "))
    expected = report.project_seconds(report.REAL_TRAIN, 1.0, 0.05) / 60  # the median rate, 1,000 img/s
    assert f"train {expected:5.1f} min" in sz160 and "bound by the cores" in sz160


def test_throughput_profile_spans_up_to_the_most_members_seen():
    """The 2-rank build's probe falls back while the merged parts are removed one by one: the
    profile still spans every member, in ten equal tenths."""
    steps = importlib.import_module("scale_steps")
    samples = [{"t": float(t), "probe": 100 * t, "main_cpu_s": 0.0, "main_sys_s": 0.0, "tree_cpu_s": t / 10,
                "main_rss_mib": 1.0, "available_mib": 1.0} for t in range(11)]
    samples += [{**samples[-1], "t": 11.0, "probe": 600}, {**samples[-1], "t": 12.0, "probe": None}]
    profile = steps.throughput_profile(samples, 1000)
    assert profile["img_per_s_by_tenth"] == pytest.approx([100.0] * 10)
    assert profile["streaming_s"] == 10.0 and profile["after_last_member_s"] == 2.0

"""bench/gpu.py on CPU with --tiny (one run, ~10 s, shared by the tests below): the rows it
reports, why skipped rows are skipped, ratios and projection computed from what was measured,
plus the pure arithmetic of bench/gpu_report.py on hand-made numbers."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # as bench/gpu.py itself does for its siblings

gpu = importlib.import_module("gpu")
report = importlib.import_module("gpu_report")
SIZES = (32, 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(json result, printed text, cache dir) of `bench/gpu.py --tiny --device cpu`."""
    tmp = tmp_path_factory.mktemp("bench_gpu")
    # --tiny builds its fixture from prep sample's generated images: no photo package needed
    argv = ["--tiny", "--device", "cpu", "--cache", str(tmp / "cache"), "--json-out", str(tmp / "r.json")]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert gpu.main(argv) == 0
    return json.loads((tmp / "r.json").read_text()), text.getvalue(), tmp / "cache"


def by_key(rows):
    return {(r["config"], r["arch"], r["crop_size"], r["precision"], r["compile"]): r for r in rows}


@pytest.mark.slow
def test_rows_and_skips(tiny):
    result, text, _ = tiny
    rows = by_key(result["rows"])
    expected = {(c, "resnet18", s, "bf16", False) for c in "abcd" for s in SIZES}
    expected |= {("a", "resnet18", s, "fp16", False) for s in SIZES}
    expected |= {("a", "resnet18", s, "bf16", True) for s in SIZES}
    assert set(rows) == expected and len(result["rows"]) == len(expected)
    for key, row in rows.items():
        config, _, size, precision, compile_ = key
        if config == "c" or precision == "fp16" or compile_:
            assert row["note"].startswith("skipped: ") and "img_per_s" not in row
            assert row["ratio_vs_a"] is None and row["ratio_vs_d"] is None
        else:
            assert row["img_per_s"] > 0 and 0 <= row["data_wait"] < 1, row
            assert row["steps_measured"] == 2 and "gpu_mem_gib" not in row  # no GPU, no figure
            assert row["batch_size"] == 8
    assert all(rows[("c", "resnet18", s, "bf16", False)]["note"] == "skipped: no CUDA (GPU decode needs nvJPEG)"
               for s in SIZES)
    assert all("no CUDA" in rows[("a", "resnet18", s, "fp16", False)]["note"] for s in SIZES)
    assert all("compile" in rows[("a", "resnet18", s, "bf16", True)]["note"] for s in SIZES)
    assert rows[("b", "resnet18", 32, "bf16", False)]["train_dir"] == "train-160"
    assert "machine: no CUDA (CPU run)" in text and "torch " in text
    assert text.count("skipped: no CUDA (GPU decode needs nvJPEG)") >= 2 * len(SIZES)  # progress + table


@pytest.mark.slow
def test_ratios_come_from_measured_rates(tiny):
    result, text, _ = tiny
    rows = by_key(result["rows"])
    for size in SIZES:
        a, d = (rows[(c, "resnet18", size, "bf16", False)] for c in "ad")
        for config in "abd":
            row = rows[(config, "resnet18", size, "bf16", False)]
            assert row["ratio_vs_a"] == pytest.approx(row["img_per_s"] / a["img_per_s"])
            assert row["ratio_vs_d"] == pytest.approx(row["img_per_s"] / d["img_per_s"])
            assert f"{row['ratio_vs_d']:.2f}" in text
        assert a["ratio_vs_a"] == 1.0 and d["ratio_vs_d"] == 1.0


@pytest.mark.slow
def test_projection_reads_the_schedule_files(tiny):
    result, text, _ = tiny
    rows = by_key(result["rows"])
    assert [p["schedule"] for p in result["projection"]] == list(gpu.SCHEDULES)
    for projection in result["projection"]:
        phases = json.loads((REPO / projection["schedule"]).read_text())["phases"]
        assert projection["num_epochs"] == phases[-1]["epochs"][1]
        assert projection["arch"] == "resnet50" and projection["rates_arch"] == "resnet18"  # flagged
        for config in "abd":
            total = 0.0
            for phase, projected in zip(phases, projection["phases"], strict=True):
                epochs = phase["epochs"][1] - phase["epochs"][0]
                assert projected["crop_size"] == phase["crop_size"] and projected["num_epochs"] == epochs
                measured = rows[(config, "resnet18", 64, "bf16", False)]["img_per_s"]  # nearest: 64 px
                hours = epochs * 1_281_167 / measured / 3600
                assert projected["rates"][config]["hours"] == pytest.approx(hours)
                total += hours
            assert projection["hours"][config] == pytest.approx(total)
        assert "c" not in projection["hours"]  # nothing measured, nothing projected
    assert "NOT a measurement" in text and "not a resnet50 projection" in text


@pytest.mark.slow
def test_gpu_decode_path_runs_on_cpu_tensors(tiny):
    """(c)'s plumbing (encoded batches, batched decode, crop) through the same loop, on CPU."""
    from gpu_measure import Inputs, Job, measure

    result, _, cache = tiny
    shard_dir = cache / f"shards-{Path(result['fixture']['dir']).name}"
    inputs = Inputs("cpu", 1, {160: shard_dir / "train-160"}, None, {"arch": "resnet18"}, 1, 1, 1,
                    cache / "scratch")
    measured = measure(Job("c", "resnet18", 32, 4), inputs, 160, cap_seconds=5.0)
    assert measured["img_per_s"] > 0 and measured["steps_measured"] == 1


# --------------------------------------------------------------------------- pure arithmetic


def test_rate_at_measured_interpolated_nearest():
    rates = {128: 10_000.0, 224: 4_000.0}
    assert report.rate_at(rates, 128) == (10_000.0, "measured")
    rate, how = report.rate_at(rates, 160)
    t = (160**2 - 128**2) / (224**2 - 128**2)
    assert rate == pytest.approx(1 / ((1 - t) / 10_000 + t / 4_000)) and how.startswith("interpolated")
    assert report.rate_at(rates, 288) == (4_000.0, "nearest (224 px)")
    assert report.rate_at(rates, 64) == (10_000.0, "nearest (128 px)")


def test_window_rate_leaves_warmup_out():
    marks = [report.Mark(t, s, 40, w) for t, s, w in ((5.0, 20, 3.0), (7.0, 40, 0.5), (9.0, 60, 0.5))]
    window = report.window_rate(marks, warmup_steps=20)
    assert window["img_per_s"] == pytest.approx(80 / 4.0) and window["data_wait"] == pytest.approx(0.25)
    assert window["steps_measured"] == 40
    with pytest.raises(ValueError):
        report.window_rate(marks[:1], warmup_steps=20)


def test_defaults_and_plan_order():
    assert [report.default_batch_size(s) for s in (128, 160, 192, 224, 288, 320)] == [256, 256, 192, 192, 128, 128]
    assert [report.prep_size_for(s, (160, 320)) for s in (32, 128, 160, 224, 288)] == [160, 160, 320, 320, 320]
    rows = gpu.plan(gpu.parse_args([]))
    assert [r["compile"] for r in rows][-2:] == [True, True]  # compile rows last (budget)
    assert {r["crop_size"] for r in rows if r["arch"] == "resnet18"} == {128, 160}
    assert {r["arch"] for r in rows if r["precision"] == "fp16" or r["compile"]} == {"resnet50"}
    assert {r["batch_size"] for r in rows if r["crop_size"] == 224} == {192}

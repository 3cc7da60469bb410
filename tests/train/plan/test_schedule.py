"""train.plan.schedule: validation, queries, imagenet18 translation and the shipped recipes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train.errors import ScheduleError
from train.plan.dry_run import epoch_rows, format_table
from train.plan.imagenet18 import from_imagenet18
from train.plan.phases import load_schedule, parse_schedule
from train.plan.rebuilds import loader_changes
from train.plan.schedule import Phase, Schedule

REPO = Path(__file__).resolve().parents[3]
PHASES_DIR = REPO / "phases"


def phase(start, end, **overrides):
    data = {
        "epochs": [start, end],
        "prep_size": 160,
        "crop_size": 128,
        "batch_size": 256,
        "lr": [1.0, 2.0],
    }
    data.update(overrides)
    return data


TWO_PHASES = [phase(0, 2), phase(2, 5, prep_size=320, crop_size=224, lr=[2.0, 0.5])]


def error_of(data) -> str:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(data)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- validation -------------------------------------------------------------------------


def test_valid_schedule_resolves_defaults() -> None:
    schedule = parse_schedule(TWO_PHASES).schedule
    first = schedule.phases[0]
    assert first.epochs == (0, 2) and first.lr == (1.0, 2.0)
    assert first.min_scale == 0.08 and first.rect_val is False
    assert (first.val_prep_size, first.val_crop_size) == (160, 128)
    assert schedule.num_epochs == 5


def test_scalar_lr_is_constant_and_equals_its_pair() -> None:
    assert Phase((0, 1), 160, 128, 32, 0.5) == Phase((0, 1), 160, 128, 32, [0.5, 0.5])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([phase(0, 2, size=128)], "phase 0, key 'size': unknown key"),
        (
            [phase(0, 2), {k: v for k, v in phase(2, 4).items() if k != "batch_size"}],
            "phase 1, key 'batch_size': missing",
        ),
        ([phase(0, 2), phase(3, 5)], "phase 1, key 'epochs': gap: epochs [2, 3)"),
        ([phase(1, 2)], "phase 0, key 'epochs': gap: epochs [0, 1)"),
        ([phase(0, 3), phase(2, 5)], "phase 1, key 'epochs': overlap"),
        ([phase(0, 2), phase(2, 2)], "phase 1, key 'epochs': needs 0 <= start < end"),
        ([phase(0, 2), phase(4, 3)], "phase 1, key 'epochs': needs 0 <= start < end"),
        ([phase(0, 2, crop_size=192)], "phase 0, key 'crop_size': 192 > prep_size 160"),
        ([phase(0, 2, val_crop_size=224)], "phase 0, key 'val_crop_size': 224 > val_prep_size"),
        ([phase(0, 2, batch_size=0)], "phase 0, key 'batch_size': must be a positive integer"),
        ([phase(0, 2, prep_size=-160)], "phase 0, key 'prep_size': must be a positive integer"),
        ([phase(0, 2, crop_size=128.0)], "phase 0, key 'crop_size': must be a positive integer"),
        ([phase(0, 2, batch_size=True)], "phase 0, key 'batch_size': must be a positive integer"),
        ([phase(0, 2, lr=[1.0, 2.0, 3.0])], "phase 0, key 'lr': must be a number or [start, end]"),
        ([phase(0, 2, lr=-0.1)], "phase 0, key 'lr': must be finite and >= 0"),
        ([phase(0, 2, min_scale=0)], "phase 0, key 'min_scale': must be a number in (0, 1]"),
        ([phase(0, 2, rect_val=1)], "phase 0, key 'rect_val': must be true or false"),
        ([phase(0, 2), "x"], "phase 1: must be an object"),
        ([], "phases must be a non-empty list"),
        ({"phases": TWO_PHASES, "seed": 0}, "top-level key 'seed': unknown"),
        ({"recipe": {}}, "top-level key 'phases': missing"),
        ({"phases": TWO_PHASES, "recipe": []}, "top-level key 'recipe': must be an object"),
        ([phase(0, 2), {"ep": 2, "sz": 128, "bs": 64}], "mix our keys"),
    ],
)
def test_each_invalid_schedule_has_one_clear_message(data, expected: str) -> None:
    assert expected in error_of(data)


def test_every_train_error_has_one_base_class() -> None:
    """cli.py catches train.errors.REPORTED: every error class of train/ is under it."""
    import inspect

    import train.errors

    classes = [
        c
        for _, c in inspect.getmembers(train.errors, inspect.isclass)
        if issubclass(c, Exception) and c.__module__ == "train.errors"
    ]
    assert len(classes) >= 5 and all(issubclass(c, train.errors.TrainError) for c in classes)
    assert ScheduleError in classes


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="no such schedule file"):
        load_schedule(tmp_path / "absent.json")


def test_invalid_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"epochs": [0, 1],}]')
    with pytest.raises(ScheduleError, match=r"bad\.json: invalid JSON at line 1 column"):
        load_schedule(path)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gap.json"
    path.write_text(json.dumps([phase(0, 2), phase(3, 4)]))
    with pytest.raises(ScheduleError, match=r"gap\.json: phase 1, key 'epochs': gap"):
        load_schedule(path)


def test_recipe_and_note_come_back_unvalidated(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {"note": "n", "recipe": {"arch": "resnet18", "anything": [1]}, "phases": TWO_PHASES}
        )
    )
    loaded = load_schedule(path)
    assert loaded.note == "n" and loaded.recipe == {"arch": "resnet18", "anything": [1]}
    assert loaded.source_format == "shardtrain"
    assert loaded.schedule == parse_schedule(TWO_PHASES).schedule


def test_to_dicts_round_trips() -> None:
    schedule = parse_schedule(TWO_PHASES).schedule
    assert Schedule.from_dicts(json.loads(json.dumps(schedule.to_dicts()))) == schedule


# --- queries ----------------------------------------------------------------------------


def test_phase_at_boundaries() -> None:
    schedule = parse_schedule(TWO_PHASES).schedule
    first, second = schedule.phases
    assert schedule.phase_at(0) is first
    assert schedule.phase_at(1) is first
    assert schedule.phase_at(2) is second  # half-open: 2 belongs to the second phase
    assert schedule.phase_at(4) is second
    for outside in (-1, 5):
        with pytest.raises(ScheduleError, match=r"outside the schedule \[0, 5\)"):
            schedule.phase_at(outside)


def test_lr_at_is_linear_over_all_steps_of_a_phase() -> None:
    schedule = parse_schedule(TWO_PHASES).schedule  # phase 0: epochs [0, 2), lr 1 -> 2
    steps = 10
    assert schedule.lr_at(0, 0, steps) == 1.0  # first step = lr start
    assert schedule.lr_at(1, 0, steps) == pytest.approx(1.5)  # halfway through the phase
    assert schedule.lr_at(1, 9, steps) == pytest.approx(2.0 - 1.0 / 20)  # last step
    values = [schedule.lr_at(e, s, steps) for e in (0, 1) for s in range(steps)]
    deltas = [b - a for a, b in zip(values, values[1:])]
    assert deltas == pytest.approx([1.0 / 20] * len(deltas))
    # The next phase starts where this one was heading.
    assert schedule.lr_at(2, 0, steps) == 2.0
    # The last phase heads to its end value (0.5) at the end of epoch 5.
    assert schedule.lr_at(4, 9, 10) == pytest.approx(0.5 + 1.5 / 30)


def test_poly_lr_is_mlperfs_power_two_decay() -> None:
    """MLPerf ResNet-50 (lars_util.PolynomialDecayWithWarmup): after warm-up,
    end + (base - end) * (1 - step / decay_steps) ** 2, per step."""
    base, end, steps = 8.5, 1e-4, 10
    schedule = parse_schedule(
        [phase(0, 1, lr=[0.0, base]), phase(1, 3, lr=[base, end], lr_shape="poly")]
    ).schedule
    assert schedule.lr_at(0, 9, steps) == pytest.approx(base * 9 / 10)  # linear warm-up
    decay = [schedule.lr_at(e, s, steps) for e in (1, 2) for s in range(steps)]
    expected = [end + (base - end) * (1 - k / 20) ** 2 for k in range(20)]
    assert decay == pytest.approx(expected)
    assert decay[0] == base and decay[10] == pytest.approx(end + (base - end) / 4)  # not 1/2
    assert all(a > b for a, b in zip(decay, decay[1:]))
    rows = epoch_rows(schedule)
    assert rows[2].lr_shape == "poly"
    assert (rows[2].lr_start, rows[2].lr_end) == pytest.approx((end + (base - end) / 4, end))


def test_lr_at_constant_phase_and_bad_steps() -> None:
    schedule = parse_schedule([phase(0, 3, lr=0.1)]).schedule
    assert {schedule.lr_at(e, s, 7) for e in range(3) for s in range(7)} == {0.1}
    with pytest.raises(ScheduleError, match=r"step 7 is outside \[0, 7\)"):
        schedule.lr_at(0, 7, 7)
    with pytest.raises(ScheduleError, match="steps_per_epoch"):
        schedule.lr_at(0, 0, 0)


def test_loader_changes() -> None:
    schedule = parse_schedule(
        [
            phase(0, 2),
            phase(2, 4, crop_size=144, min_scale=0.25),  # in place
            phase(4, 5, crop_size=144, min_scale=0.25, batch_size=128),  # new batch sampler
            phase(5, 6, prep_size=320, crop_size=224, batch_size=128),  # new shards
            phase(6, 7, prep_size=320, crop_size=224, batch_size=128, rect_val=True),
        ]
    ).schedule
    start = loader_changes(schedule, 0)
    assert start.fresh and start.rebuild_train and start.rebuild_val
    assert loader_changes(schedule, 1).changed == ()
    assert not loader_changes(schedule, 1).rebuild_train
    crop = loader_changes(schedule, 2)
    assert not crop.rebuild_train and not crop.rebuild_val
    # the val crop moved, and with it the default resize (crop / 0.875)
    assert crop.in_place == ("crop_size", "min_scale", "val_crop_size", "val_resize_size")
    batch = loader_changes(schedule, 4)
    assert batch.changed == ("batch_size",) and batch.rebuild_train and batch.rebuild_val
    shards = loader_changes(schedule, 5)
    assert shards.rebuild_train and shards.rebuild_val
    assert shards.in_place == ()  # both loaders are rebuilt with the new crop
    rect = loader_changes(schedule, 6)
    assert not rect.rebuild_train and rect.rebuild_val and rect.changed == ("rect_val",)
    resumed = loader_changes(schedule, 3, fresh=True)  # after a resume: build everything
    assert resumed.rebuild_train and resumed.rebuild_val


def test_table_rows_and_text() -> None:
    schedule = parse_schedule(TWO_PHASES).schedule
    rows = epoch_rows(schedule)
    assert [r.epoch for r in rows] == list(range(5))
    assert [r.phase_index for r in rows] == [0, 0, 1, 1, 1]
    assert rows[0].train_dir_name == "train-160" and rows[0].val_dir_name == "val-160"
    assert rows[2].train_dir_name == "train-320" and rows[2].crop_size == 224
    assert (rows[0].lr_start, rows[0].lr_end) == (1.0, 1.5)
    assert (rows[1].lr_start, rows[1].lr_end) == (1.5, 2.0)
    assert rows[4].lr_end == 0.5
    assert rows[0].loaders == "build train+val" and rows[1].loaders == ""
    assert rows[2].loaders.startswith("rebuild train+val")
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 6 and lines[0].split()[:3] == ["epoch", "phase", "train_dir"]
    assert "1 -> 1.5" in lines[1] and "train-320" in lines[3]
    assert len({line.index("train-") for line in lines[1:]}) == 1  # aligned


# --- imagenet18's original lists --------------------------------------------------------


def test_imagenet18_original_equals_our_translation() -> None:
    original = load_schedule(PHASES_DIR / "imagenet18-original.json")
    ours = load_schedule(PHASES_DIR / "imagenet18-1x8.json")
    assert original.source_format == "imagenet18" and ours.source_format == "shardtrain"
    assert original.schedule == ours.schedule
    assert original.recipe == ours.recipe


# diux-dev/imagenet18's older 35-epoch one_machine list and eight_machines list.
LR = 1.0
ONE_MACHINE_35 = [
    {"ep": 0, "sz": 128, "bs": 512, "trndir": "-sz/160"},
    {"ep": [0, 5], "lr": [LR, LR * 2]},
    {"ep": 5, "lr": LR},
    {"ep": 14, "sz": 224, "bs": 224, "lr": LR * 224 / 512},
    {"ep": 16, "lr": LR / 10 * 224 / 512},
    {"ep": 27, "lr": LR / 100 * 224 / 512},
    {
        "ep": 32,
        "sz": 288,
        "bs": 128,
        "min_scale": 0.5,
        "rect_val": True,
        "lr": LR / 100 * 128 / 512,
    },
    {"ep": [33, 35], "lr": LR / 1000 * 128 / 512},
]
LR8 = 0.235 * 8
EIGHT_MACHINES = [
    {"ep": 0, "sz": 128, "bs": 128, "trndir": "-sz/160"},
    {"ep": [0, 6], "lr": [LR8, LR8 * 2]},
    {"ep": 6, "bs": 256, "keep_dl": True, "lr": LR8 * 2},
    {"ep": [11, 14], "lr": [LR8 * 2, LR8]},
    {"ep": 14, "sz": 224, "bs": 128, "trndir": "-sz/352", "min_scale": 0.087, "lr": LR8},
    {"ep": 17, "bs": 224, "keep_dl": True},
    {"ep": [17, 23], "lr": [LR8, LR8 / 10 * 224 / 128]},
    {"ep": [23, 29], "lr": [LR8 / 10 * 224 / 128, LR8 / 100 * 224 / 128]},
    {"ep": 29, "sz": 288, "bs": 128, "min_scale": 0.5, "rect_val": True},
    {"ep": [29, 35], "lr": [LR8 / 100, LR8 / 1000]},
]


def test_imagenet18_data_phases_do_not_inherit_but_keep_dl_does() -> None:
    schedule = from_imagenet18(EIGHT_MACHINES)
    assert schedule.num_epochs == 35
    assert [p.epochs for p in schedule.phases] == [
        (0, 6),
        (6, 11),
        (11, 14),
        (14, 17),
        (17, 23),
        (23, 29),
        (29, 35),
    ]
    keep = schedule.phase_at(6)  # keep_dl: same data, new per-GPU batch
    assert (keep.prep_size, keep.crop_size, keep.batch_size) == (160, 128, 256)
    keep = schedule.phase_at(17)
    assert (keep.prep_size, keep.min_scale, keep.batch_size) == (352, 0.087, 224)
    last = schedule.phase_at(29)  # no trndir -> full size -> largest -sz/N (352)
    assert (last.prep_size, last.crop_size, last.min_scale, last.rect_val) == (352, 288, 0.5, True)
    assert schedule.phase_at(11).lr == pytest.approx((LR8 * 2, LR8))
    assert schedule.phase_at(6).lr == (LR8 * 2, LR8 * 2)


def test_imagenet18_scalar_lr_phases_and_full_size() -> None:
    # 224 px from full-size images: the largest -sz/N in the list (160) is too small.
    with pytest.raises(
        ScheduleError,
        match=r"entry 3, key 'trndir': '' means full-size "
        r"images, here prep_size 160 < sz 224; pass a larger full_prep_size",
    ):
        from_imagenet18(ONE_MACHINE_35)
    no_shards = [{"ep": 0, "sz": 128, "bs": 64}, {"ep": [0, 1], "lr": 0.1}]
    with pytest.raises(ScheduleError, match="entry 0, key 'trndir': '' means full-size"):
        from_imagenet18(no_shards)
    assert from_imagenet18(no_shards, full_prep_size=160).phases[0].prep_size == 160
    schedule = from_imagenet18(ONE_MACHINE_35, full_prep_size=352)
    assert [p.epochs for p in schedule.phases] == [
        (0, 5),
        (5, 14),
        (14, 16),
        (16, 27),
        (27, 32),
        (32, 33),
        (33, 35),
    ]
    assert schedule.phase_at(14).prep_size == 352 and schedule.phase_at(14).min_scale == 0.08
    assert schedule.phase_at(5).lr == (1.0, 1.0)
    assert schedule.phase_at(33).lr == (LR / 1000 * 128 / 512,) * 2


def test_imagenet18_splits_linear_lr_at_data_boundaries() -> None:
    schedule = from_imagenet18(
        [
            {"ep": 0, "sz": 128, "bs": 256, "trndir": "-sz/160"},
            {"ep": [0, 4], "lr": [0.0, 2.0]},
            {"ep": 1, "sz": 128, "bs": 512, "trndir": "-sz/160"},
        ]
    )
    assert [(p.epochs, p.lr, p.batch_size) for p in schedule.phases] == [
        ((0, 1), (0.0, 0.5), 256),
        ((1, 4), (0.5, 2.0), 512),
    ]
    assert schedule.lr_at(0, 3, 4) == pytest.approx(0.375)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            [{"ep": 0, "sz": 128, "bs": 64, "trndir": "-sz/160", "mom": 0.9}],
            "entry 0, key 'mom': unknown key",
        ),
        (
            [{"ep": 0, "sz": 128, "bs": 64, "trndir": "/data/160"}, {"ep": [0, 1], "lr": 1.0}],
            "entry 0, key 'trndir': expected '-sz/<prep_size>'",
        ),
        (
            [{"ep": 0, "sz": 128, "bs": 64, "trndir": "-sz/160"}, {"ep": 0, "lr": [1.0, 2.0]}],
            "entry 1, key 'ep': a linear lr [start, end] needs ep [start, end]",
        ),
        (
            [
                {"ep": 0, "sz": 128, "bs": 64, "trndir": "-sz/160"},
                {"ep": [0, 2], "lr": [1.0, 2.0]},
                {"ep": [3, 4], "lr": 0.1},
            ],
            "linear LR phase [0, 2] ends before",
        ),
        (
            [{"ep": 0, "bs": 64, "keep_dl": True}, {"ep": [0, 1], "lr": 1.0}],
            "entry 0, key 'keep_dl': needs an earlier data phase",
        ),
        (
            [
                {"ep": 0, "sz": 128, "bs": 64, "trndir": "-sz/160"},
                {"ep": 1, "sz": 96, "bs": 64, "keep_dl": True},
                {"ep": [0, 2], "lr": 1.0},
            ],
            "entry 1, key 'sz': keep_dl keeps",
        ),
        (
            [{"ep": 0, "sz": 128, "trndir": "-sz/160"}, {"ep": [0, 1], "lr": 1.0}],
            "entry 0, key 'bs': missing",
        ),
        (
            [{"ep": 1, "sz": 128, "bs": 64, "trndir": "-sz/160"}, {"ep": [0, 2], "lr": 1.0}],
            "no data phase ('bs') at epoch 0",
        ),
        (
            [{"ep": 0, "sz": 128, "bs": 64, "trndir": "-sz/160"}, {"ep": 0, "lr": 1.0}],
            "the last LR phase needs ep [start, end]",
        ),
        (
            [{"ep": 0, "sz": 192, "bs": 64, "trndir": "-sz/160"}, {"ep": [0, 1], "lr": 1.0}],
            "key 'crop_size': 192 > prep_size 160",
        ),
    ],
)
def test_imagenet18_errors(entries, expected: str) -> None:
    assert expected in error_of(entries)


# --- the shipped recipes ----------------------------------------------------------------


RECIPE_FILES = sorted(PHASES_DIR.glob("*.json"))


def test_the_expected_recipes_ship() -> None:
    assert {p.name for p in RECIPE_FILES} >= {
        "imagenet18-1x8.json",
        "imagenet18-original.json",
        "rn50-16ep.json",
        "rn18-16ep.json",
        "demo.json",
        "mlperf-rn50.json",
        "tv-rn50-v2.json",
        "rsb-a3.json",
    }


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_every_recipe_loads_with_a_note_and_recipe(path: Path) -> None:
    loaded = load_schedule(path)
    assert loaded.note and "per gpu" in loaded.note.lower().replace("-", " ")
    assert loaded.recipe["arch"] in {"resnet18", "resnet50"}
    assert loaded.recipe["tuned_num_gpus"] >= 1
    schedule = loaded.schedule
    for before, after in zip(schedule.phases, schedule.phases[1:]):
        if before.prep_size == after.prep_size and before.batch_size == after.batch_size:
            assert before.lr[1] == pytest.approx(after.lr[0])  # no jump inside one loader


@pytest.mark.parametrize(
    ("name", "peak", "num_gpus"), [("rn50-16ep.json", 1.7, 8), ("rn18-16ep.json", 0.5, 1)]
)
def test_ffcv_recipes_follow_ffcv(name: str, peak: float, num_gpus: int) -> None:
    loaded = load_schedule(PHASES_DIR / name)
    schedule = loaded.schedule
    assert schedule.num_epochs == 16 and loaded.recipe["tuned_num_gpus"] == num_gpus
    assert loaded.recipe["label_smoothing"] == 0.1
    assert [schedule.phase_at(e).crop_size for e in range(16)] == [160] * 12 + [192] * 4
    assert {(p.val_dir_name, p.val_crop_size) for p in schedule.phases} == {("val-320", 256)}
    steps = 100
    assert schedule.lr_at(0, 0, steps) == pytest.approx(1e-4 * peak)
    assert schedule.lr_at(2, 0, steps) == pytest.approx(peak)
    for epoch in range(2, 16):  # FFCV: linear from the peak at epoch 2 to 0 at epoch 16
        assert schedule.lr_at(epoch, 0, steps) == pytest.approx(peak * (16 - epoch) / 14)
    assert schedule.phases[-1].lr[1] == 0.0


def test_mlperf_recipe_follows_the_reference() -> None:
    """mlcommons/training image_classification (docs/RECIPES.md): global batch 2048, LARS,
    lars_util.PolynomialDecayWithWarmup(8.5, end 1e-4, power 2, 5 warm-up epochs), 41 epochs,
    evaluation after epochs 2, 6, 10, ... (epochs_between_evals 4, eval_offset_epochs 2)."""
    loaded = load_schedule(PHASES_DIR / "mlperf-rn50.json")
    schedule, recipe = loaded.schedule, loaded.recipe
    assert (
        schedule.num_epochs == 41
        and recipe["tuned_num_gpus"] * schedule.phases[0].batch_size == 2048
    )
    assert (recipe["optimizer"], recipe["weight_decay"], recipe["label_smoothing"]) == (
        "lars",
        2e-4,
        0.1,
    )
    assert (recipe["eval_every"], recipe["eval_offset"], recipe["targets"]) == (
        4,
        2,
        {"top1": 75.9},
    )
    steps = 625  # 1,281,167 // 2048
    warmup, train = 5 * steps, 41 * steps
    for epoch, step in ((0, 0), (2, 100), (4, 624), (5, 0), (20, 300), (40, 624)):
        k = epoch * steps + step
        if k < warmup:
            expected = 8.5 * k / warmup
        else:
            expected = 1e-4 + (8.5 - 1e-4) * (1 - (k - warmup) / (train - warmup)) ** 2
        assert schedule.lr_at(epoch, step, steps) == pytest.approx(expected)
    assert {(p.val_resize_size, p.val_crop_size, p.min_scale) for p in schedule.phases} == {
        (256, 224, 0.1)
    }


def test_torchvision_recipe_matches_its_per_epoch_schedulers() -> None:
    """torchvision's train.py steps LinearLR(start_factor 0.01, 5 epochs) then
    CosineAnnealingLR(T_max 595) once per epoch: ours equals both at every epoch's first step."""
    loaded = load_schedule(PHASES_DIR / "tv-rn50-v2.json")
    schedule, recipe = loaded.schedule, loaded.recipe
    assert (
        schedule.num_epochs == 600
        and recipe["tuned_num_gpus"] * schedule.phases[0].batch_size == 1024
    )
    for epoch in range(600):
        if epoch < 5:
            torchvision_lr = 0.5 * (0.01 + 0.99 * epoch / 5)
        else:
            torchvision_lr = 0.5 * (1 + math.cos(math.pi * (epoch - 5) / 595)) / 2
        assert schedule.lr_at(epoch, 0, 1251) == pytest.approx(torchvision_lr, abs=1e-12)
    # EMA: 0.99998 adjusted by world x batch x ema_steps / epochs, applied every 32 steps
    per_update = 1 - (1 - 0.99998) * 8 * 128 * 32 / 600
    assert recipe["ema_decay"] == pytest.approx(per_update ** (1 / 32), abs=1e-8)
    assert {(p.crop_size, p.val_resize_size, p.val_crop_size) for p in schedule.phases} == {
        (176, 232, 224)
    }
    assert (recipe["repeat_aug"], recipe["random_erasing"], recipe["auto_augment"]) == (
        4,
        0.1,
        "ta_wide",
    )


def test_rsb_a3_recipe_follows_timm() -> None:
    """timm resnet50.a3_in1k: 160 px train, 224 test at crop_pct 0.95 (floor(224 / 0.95)),
    LAMB with timm's eps and in-optimizer clip, BCE, 100 epochs, 5 of them warm-up."""
    loaded = load_schedule(PHASES_DIR / "rsb-a3.json")
    schedule, recipe = loaded.schedule, loaded.recipe
    assert (
        schedule.num_epochs == 100
        and recipe["tuned_num_gpus"] * schedule.phases[0].batch_size == 2048
    )
    assert (recipe["optimizer"], recipe["eps"], recipe["grad_clip"]) == ("lamb", 1e-6, 1.0)
    assert (recipe["loss"], recipe["label_smoothing"], recipe["weight_decay"]) == ("bce", 0.0, 0.02)
    assert {(p.crop_size, p.val_resize_size, p.val_crop_size) for p in schedule.phases} == {
        (160, math.floor(224 / 0.95), 224)
    }
    assert schedule.lr_at(5, 0, 100) == 8e-3 and schedule.phases[-1].lr[1] == 0.0


def test_demo_is_small_enough_for_two_cpu_cores() -> None:
    loaded = load_schedule(PHASES_DIR / "demo.json")
    schedule = loaded.schedule
    assert loaded.recipe["arch"] == "resnet18"
    assert schedule.num_epochs <= 10
    assert {p.prep_size for p in schedule.phases} == {160}
    assert max(p.crop_size for p in schedule.phases) <= 112
    assert all(p.batch_size <= 64 for p in schedule.phases)
    assert schedule.phases[0].lr[0] < schedule.phases[0].lr[1]  # warm-up, then decay
    assert schedule.phases[-1].lr[1] < schedule.phases[1].lr[0]


# --- purity -----------------------------------------------------------------------------


def test_import_pulls_in_neither_torch_nor_typer() -> None:
    code = (
        "import sys, train.plan.schedule, train.plan.phases, train.plan.rebuilds; "
        "import train.plan.dry_run; "
        "bad = [m for m in ('torch', 'typer', 'numpy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr

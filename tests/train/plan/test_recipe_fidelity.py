"""Recipe keys that published recipes set: BlurPool, stochastic depth, LR shapes, crop ramps,
gradient accumulation, auto-augment policies, timm models; each checked at the boundary."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

from tests.loader_shards import dataset_dir
from tests.train.standin import StandInData
from train.data.auto_augment import AutoAugment
from train.data.crops import TrainCrop
from train.data.loaders import TrainLoader
from train.engine.layers import add_blurpool, add_drop_path, count_blurpool
from train.engine.loop import TrainState, train_steps
from train.engine.model import build_model
from train.engine.optim import build_optimizer
from train.engine.step import ModelStep, seeded
from train.errors import RecipeError, ScheduleError
from train.export import export
from train.plan.config import Recipe, RunConfig
from train.plan.dry_run import epoch_rows, format_table
from train.plan.phases import parse_schedule
from train.plan.rebuilds import loader_changes
from train.run.main import run

CPU = torch.device("cpu")


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


def schedule_of(*phases):
    return parse_schedule(list(phases)).schedule


def schedule_error(*phases) -> str:
    with pytest.raises(ScheduleError) as info:
        schedule_of(*phases)
    return str(info.value)


# --- BlurPool ---------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "expected"), [("resnet18", 6), ("resnet50", 6)])
def test_blurpool_blurs_every_subsampling_conv_but_the_stem(arch, expected) -> None:
    model = build_model(Recipe(arch=arch, blurpool=True), num_classes=5)
    assert count_blurpool(model) == expected  # layer2-4: the strided conv and the downsample
    assert not hasattr(model.conv1, "blur_filter")  # 3 input channels: not blurred
    plain = torchvision.models.get_model(arch, num_classes=5)
    assert list(model.state_dict()) == list(plain.state_dict())  # no new keys
    torch.manual_seed(0)
    blurred = build_model(Recipe(arch=arch, blurpool=True), 5).eval()
    torch.manual_seed(0)
    unblurred = build_model(Recipe(arch=arch), 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(blurred(x), unblurred(x))


def test_blurpool_filter_is_a_normalized_binomial() -> None:
    conv = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)
    assert add_blurpool(torch.nn.Sequential(conv)) == 1
    kernel = conv.blur_filter[0, 0]
    assert torch.allclose(
        kernel, torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    )
    flat = torch.ones(1, 16, 8, 8)  # a flat image stays flat inside the border
    with torch.no_grad():
        reference = torch.nn.functional.conv2d(flat, conv.weight, conv.bias, 2, 1)
        assert torch.allclose(conv(flat)[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-5)


@pytest.mark.slow
def test_blurpool_run_exports_weights_torchvision_loads(tmp_path: Path) -> None:
    phases = tmp_path / "p.json"
    phases.write_text(
        json.dumps(
            {
                "recipe": {"arch": "resnet18", "blurpool": True},
                "phases": [phase(0, 1, crop_size=32, batch_size=8, lr=0.05)],
            }
        )
    )
    run(
        RunConfig(
            phases,
            out_dir=tmp_path / "run",
            device="cpu",
            progress=False,
            tensorboard=False,
            threads=1,
        ),
        StandInData(num_train=16, num_val=6),
    )
    info = export(tmp_path / "run", tmp_path / "w.pt")
    assert info["blurpool"]
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(weights)  # strict: the keys are torchvision's
    trained = build_model(Recipe(arch="resnet18", blurpool=True), 3)
    trained.load_state_dict(
        torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)["model"]
    )
    add_blurpool(model)  # what the export note tells users to do
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained.eval()(x))


# --- stochastic depth -------------------------------------------------------------------


def test_drop_path_rises_with_depth_and_only_trains() -> None:
    torch.manual_seed(0)
    model = build_model(Recipe(arch="resnet18", drop_path=0.5, zero_init_residual=False), 3)
    torch.manual_seed(0)
    plain = build_model(Recipe(arch="resnet18", zero_init_residual=False), 3)
    rates = add_drop_path(torchvision.models.resnet18(), 0.5)
    assert len(rates) == 8 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)
    assert rates == sorted(rates)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))  # evaluation is unchanged
        model.train()
        with seeded(7, CPU):
            first = model(x)
        with seeded(7, CPU):
            again = model(x)
        with seeded(8, CPU):
            other = model(x)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_drop_path_needs_a_resnet() -> None:
    with pytest.raises(RecipeError, match="drop_path': needs a torchvision ResNet"):
        Recipe.from_mapping({"arch": "squeezenet1_1", "drop_path": 0.1})
    with pytest.raises(RecipeError, match="drop_path"):
        Recipe.from_mapping({"arch": "resnet18", "drop_path": 1.0})


# --- LR shapes --------------------------------------------------------------------------


def test_lr_shapes() -> None:
    cosine = schedule_of(phase(0, 2, lr=[1.0, 0.0], lr_shape="cosine"))
    assert cosine.lr_at(0, 0, 10) == 1.0
    assert cosine.lr_at(1, 0, 10) == pytest.approx(0.5)  # half way
    assert cosine.lr_at(0, 5, 10) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    step = schedule_of(phase(0, 3, lr=[0.1, 0.001], lr_shape="step"))
    assert [step.lr_at(e, s, 4) for e in range(3) for s in (0, 3)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    constant = schedule_of(phase(0, 2, lr=0.3, lr_shape="constant"))
    assert {constant.lr_at(e, s, 5) for e in range(2) for s in range(5)} == {0.3}
    linear = schedule_of(phase(0, 2, lr=[1.0, 2.0]))  # the default, unchanged
    assert linear.phases[0].lr_shape == "linear" and linear.lr_at(1, 5, 10) == 1.75


def test_lr_shape_errors_and_dry_run_column() -> None:
    assert "lr_shape 'constant' needs one LR" in schedule_error(phase(0, 2, lr_shape="constant"))
    assert "key 'lr_shape': must be one of" in schedule_error(phase(0, 2, lr_shape="exp"))
    assert "start and end must be > 0" in schedule_error(
        phase(0, 2, lr=[1.0, 0.0], lr_shape="step")
    )
    text = format_table(epoch_rows(schedule_of(phase(0, 2, lr=[1.0, 0.0], lr_shape="cosine"))))
    header, first = text.splitlines()[:2]
    assert "lr_shape" in header.split() and "cosine" in first and "1 -> 0.5" in first


# --- crop ramps -------------------------------------------------------------------------


def test_crop_ramp_is_ffcvs_resolution_schedule() -> None:
    """FFCV rn50 16 epochs: min_res 160, max_res 192, start_ramp 11, end_ramp 13, rounded to
    multiples of 32: 160 up to epoch 11, 192 from 12 on."""
    schedule = schedule_of(
        phase(0, 11, prep_size=320, crop_size=160),
        phase(11, 14, prep_size=320, crop_size=[160, 192]),
        phase(14, 16, prep_size=320, crop_size=192),
    )
    assert [schedule.phase_at(e).crop_size_at(e) for e in range(16)] == [160] * 12 + [192] * 4
    exact = schedule_of(phase(0, 5, prep_size=320, crop_size=[160, 192], crop_multiple=1))
    assert [exact.phase_at(e).crop_size_at(e) for e in range(5)] == [160, 168, 176, 184, 192]
    assert exact.phases[0].val_crop_size == 192  # a ramp validates at its last crop
    changes = [loader_changes(exact, e) for e in range(1, 5)]
    assert all(c.in_place == ("crop_size",) and not c.rebuild_train for c in changes)
    rows = epoch_rows(exact)
    assert [r.crop_size for r in rows] == [160, 168, 176, 184, 192]
    assert rows[1].loaders == "in place: crop_size"
    assert parse_schedule(exact.to_dicts()).schedule == exact


def test_crop_ramp_errors() -> None:
    assert "ramp [first, last] needs a phase of 2 or more" in schedule_error(
        phase(0, 1, crop_size=[96, 128])
    )
    assert "key 'crop_size': 192 > prep_size 160" in schedule_error(
        phase(0, 3, crop_size=[128, 192])
    )
    assert "rounds to 0" in schedule_error(phase(0, 3, crop_size=[8, 16]))
    assert "positive integer or a ramp" in schedule_error(phase(0, 3, crop_size=[8, "x"]))
    assert "key 'crop_multiple': must be a positive integer" in schedule_error(
        phase(0, 3, crop_multiple=0)
    )


# --- gradient accumulation --------------------------------------------------------------


def bn_free_trainer(seed: int = 0) -> ModelStep:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    recipe = Recipe(arch="resnet18", weight_decay=1e-3, momentum=0.9, nesterov=True)
    return ModelStep(model, build_optimizer(model, recipe, CPU), CPU, "fp32", 0.1)


class Batches:
    """DeviceBatches over a list."""

    data_wait_seconds = 0.0

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_accumulation_equals_the_large_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, 3, 12, 12, generator=generator)  # 6 large batches of 16
    labels = torch.randint(0, 5, (6, 16), generator=generator)
    large, small = bn_free_trainer(), bn_free_trainer()
    lr = lambda step: 0.1 * (step + 1)  # noqa: E731
    train_steps(
        large,
        TrainState(),
        Batches(list(zip(x, labels))),
        steps=6,
        lr_at=lr,
        on_sync=lambda sync: None,
        sync_every=2,
        seed=3,
    )
    micro = [(xb[i : i + 4], lb[i : i + 4]) for xb, lb in zip(x, labels) for i in range(0, 16, 4)]
    synced = []
    train_steps(
        small,
        TrainState(),
        Batches(micro),
        steps=6,
        lr_at=lr,
        on_sync=synced.append,
        sync_every=2,
        accum_steps=4,
        seed=3,
    )
    for a, b in zip(large.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [s.step for s in synced] == [2, 4, 6] and synced[-1].images == 32


def test_accumulation_all_reduces_once_per_step() -> None:
    """Under DDP the inner backward passes run in no_sync()."""
    calls = []

    class FakeDDP:
        @contextlib.contextmanager
        def no_sync(self):
            calls.append("no_sync")
            yield

    trainer = bn_free_trainer()
    trainer.ddp = FakeDDP()
    batches = [(torch.randn(4, 3, 12, 12), torch.arange(4) % 5) for _ in range(3)]
    trainer.accumulate(batches, 0.1, [None, None, None])
    assert calls == ["no_sync", "no_sync"]  # not the last one: its backward all-reduces


@pytest.mark.slow
def test_accumulation_in_the_schedule_and_the_run(tmp_path: Path) -> None:
    assert "key 'accum_steps': must be a positive integer" in schedule_error(
        phase(0, 1, accum_steps=0)
    )
    schedule = schedule_of(phase(0, 1, batch_size=4, crop_size=32, lr=0.05, accum_steps=2))
    assert format_table(epoch_rows(schedule)).splitlines()[1].split()[5] == "4x2"
    phases = tmp_path / "p.json"
    phases.write_text(json.dumps({"recipe": {"arch": "resnet18"}, "phases": schedule.to_dicts()}))
    last = run(
        RunConfig(
            phases,
            out_dir=tmp_path / "run",
            device="cpu",
            progress=False,
            tensorboard=False,
            log_every=1,
            threads=1,
        ),
        StandInData(num_train=24, num_val=6),
    )
    assert last["accum_steps"] == 2 and last["global_batch_size"] == 8
    saved = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert saved["global_step"] == 3  # 24 images / (4 x 2)


# --- auto-augment -----------------------------------------------------------------------


def test_auto_augment_is_per_image_and_reproducible(built_shards) -> None:
    directory = dataset_dir(built_shards)
    batches = {}
    for name, workers, augment in (
        ("plain", 0, None),
        ("ra0", 0, AutoAugment("ra")),
        ("ra2", 2, AutoAugment("ra")),
    ):
        loader = TrainLoader(directory, 6, TrainCrop(48), workers=workers, augment=augment)
        try:
            loader.set_epoch(0)
            batches[name] = [images.clone() for images, _ in loader]
        finally:
            loader.close()
    assert all(torch.equal(a, b) for a, b in zip(batches["ra0"], batches["ra2"]))
    assert not all(torch.equal(a, b) for a, b in zip(batches["plain"], batches["ra0"]))
    with pytest.raises(RecipeError, match="auto_augment': must be one of ra, ta_wide, imagenet"):
        Recipe.from_mapping({"auto_augment": "rand"})
    for name in ("ta_wide", "imagenet"):
        images = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
        AutoAugment(name)(images, [1, 2])
        assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16)


# --- timm -------------------------------------------------------------------------------


def test_timm_model_trains_and_exports(tmp_path: Path) -> None:
    import timm

    recipe = Recipe.from_mapping({"arch": "timm/test_resnet", "drop_path": 0.05})
    assert recipe.is_timm
    with pytest.raises(RecipeError, match="timm has no model 'nope'"):
        Recipe.from_mapping({"arch": "timm/nope"})
    phases = tmp_path / "p.json"
    phases.write_text(
        json.dumps(
            {
                "recipe": recipe.to_dict(),
                "phases": [phase(0, 1, crop_size=32, batch_size=8, lr=0.05)],
            }
        )
    )
    run(
        RunConfig(
            phases,
            out_dir=tmp_path / "run",
            device="cpu",
            progress=False,
            tensorboard=False,
            threads=1,
        ),
        StandInData(num_train=16, num_val=6),
    )
    export(tmp_path / "run", tmp_path / "w.pt")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))  # strict


def test_timm_arch_without_timm_is_one_clear_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(RecipeError, match=r"'timm/resnet50d' needs timm \(pip install"):
        Recipe.from_mapping({"arch": "timm/resnet50d"})

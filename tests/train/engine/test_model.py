"""Recipe checks, model init tricks, optimizer groups, the step/eval functions, `train bench`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from tests.train.standin import StandInData
from train.bench.phases import BenchConfig, SyntheticBatches, bench_phases, format_bench, verdict
from train.engine.loop import evaluate
from train.engine.model import build_model
from train.engine.optim import build_optimizer
from train.engine.step import ModelStep, make_mix, resolve_precision, step_seed
from train.errors import RecipeError
from train.plan.config import Recipe

CPU = torch.device("cpu")


def test_recipe_defaults_overrides_and_errors() -> None:
    recipe = Recipe.from_mapping(
        {"arch": "resnet18", "weight_decay": 0}, arch=None, label_smoothing=0.1
    )
    assert (recipe.arch, recipe.weight_decay, recipe.label_smoothing) == ("resnet18", 0, 0.1)
    assert Recipe.from_mapping({}).arch == "resnet50"
    for data, message in [
        ({"lr": 1}, "recipe key 'lr': unknown"),
        ({"optimizer": "adam"}, "'optimizer': must be one of sgd, adamw, lamb, lars, got 'adam'"),
        ({"nesterov": 1}, "must be true or false"),
        ({"ema_decay": 1.0}, "'ema_decay': must be a number in [0, 1)"),
        ({"targets": {"top3": 1}}, "'targets'"),
    ]:
        with pytest.raises(RecipeError, match=re.escape(message)):
            Recipe.from_mapping(data)


@pytest.mark.parametrize(
    ("arch", "block", "last_bn"), [("resnet18", BasicBlock, "bn2"), ("resnet50", Bottleneck, "bn3")]
)
def test_zero_init_of_the_last_bn_gamma_per_block(arch, block, last_bn) -> None:
    model = build_model(Recipe(arch=arch), num_classes=7)
    blocks = [m for m in model.modules() if isinstance(m, block)]
    assert blocks and all(torch.count_nonzero(getattr(b, last_bn).weight) == 0 for b in blocks)
    assert all(torch.count_nonzero(b.bn1.weight) > 0 for b in blocks)
    assert model.fc.out_features == 7
    plain = build_model(Recipe(arch=arch, zero_init_residual=False), num_classes=7)
    assert all(
        torch.count_nonzero(getattr(b, last_bn).weight) > 0
        for b in plain.modules()
        if isinstance(b, block)
    )


def test_precision_resolution() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"


def tiny_trainer(mix=None, precision="fp32") -> ModelStep:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 6),
    )
    return ModelStep(model, build_optimizer(model, Recipe(), CPU), CPU, precision, 0.1, mix=mix)


def test_mixup_cutmix_draws_depend_only_on_the_step_seed() -> None:
    x, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 6
    losses = []
    for _ in range(2):
        trainer = tiny_trainer(make_mix(0.2, 1.0, 6))
        torch.manual_seed(123)  # the global stream must not matter
        losses.append(
            [trainer.step(x, labels, 0.1, step_seed(0, 0, s, 0)).item() for s in range(3)]
        )
        torch.randn(5)
    assert losses[0] == losses[1]
    assert step_seed(0, 1, 2, 3) != step_seed(0, 1, 2, 4)
    assert make_mix(0.0, 0.0, 6) is None


def test_bf16_autocast_on_cpu_trains() -> None:
    trainer = tiny_trainer(precision="bf16")
    loss = trainer.step(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), 0.1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_evaluate_counts_exactly_and_skips_empty_batches() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3))
    x = torch.eye(3).view(3, 3, 1, 1)  # logits = one-hot of the true class
    labels = torch.tensor([0, 1, 2])
    batches = [(x, labels), (x[:0], labels[:0]), (x, torch.tensor([1, 1, 1]))]
    correct1, correct5, count, _ = evaluate(model, batches, CPU, "fp32").tolist()
    assert (correct1, correct5, count) == (4, 6, 6)  # top-5 of 3 classes: every label
    assert model.training  # restored


@pytest.mark.slow
def test_bench_compares_synthetic_and_real(tmp_path: Path) -> None:
    phases = tmp_path / "p.json"
    phases.write_text(
        json.dumps(
            {
                "recipe": {"arch": "resnet18"},
                "phases": [
                    {
                        "epochs": [0, 1],
                        "prep_size": 160,
                        "crop_size": 32,
                        "batch_size": 8,
                        "lr": 0.1,
                    },
                    {
                        "epochs": [1, 2],
                        "prep_size": 160,
                        "crop_size": 32,
                        "batch_size": 8,
                        "lr": 0.05,
                    },
                ],
            }
        )
    )
    batches = SyntheticBatches(4, 16, 3, 2, CPU)
    assert len(list(batches)) == 2 and batches.x.is_contiguous(memory_format=torch.channels_last)
    rows = bench_phases(
        BenchConfig(phases, device="cpu", steps=2, warmup_steps=1), data=StandInData(num_train=48)
    )
    assert len(rows) == 1  # same shards, crop and batch: measured once
    (row,) = rows
    assert row["synthetic_img_per_s"] > 0 and row["real_img_per_s"] > 0
    assert 0 <= row["data_wait"] <= 1
    assert row["verdict"] in ("data-bound", "contended", "model-bound")
    assert verdict(100, 50, 0.3) == "data-bound" and verdict(100, 50, 0.01) == "contended"
    assert verdict(100, 95, 0.01) == "model-bound"
    assert "synthetic img/s" in format_bench(rows).splitlines()[0]

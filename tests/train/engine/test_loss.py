"""The training loss: BCE numerically equal to timm's BinaryCrossEntropy (labels, smoothing,
mixup/cutmix soft targets, threshold), CE as before, and ModelStep training on the one asked."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from tests.train.standin import StandInData
from train.engine.loss import bce_loss, smoothed_targets, training_loss
from train.engine.optim import build_optimizer
from train.engine.step import ModelStep, make_mix, seeded
from train.plan.config import Recipe, RunConfig
from train.run.main import run
from train.run.metrics import read_metrics

CPU = torch.device("cpu")
CLASSES = 7


def logits_and_labels(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(batch, CLASSES, generator=generator)
    return logits, torch.randint(0, CLASSES, (batch,), generator=generator)


def mixed_pairs(labels: torch.Tensor, lam: float) -> torch.Tensor:
    """What transforms.v2 MixUp/CutMix hand the loss: lam * one_hot + (1 - lam) * flipped."""
    one_hot = F.one_hot(labels, CLASSES).float()
    return lam * one_hot + (1 - lam) * one_hot.flip(0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_bce_on_class_labels_equals_timm(smoothing, threshold) -> None:
    logits, labels = logits_and_labels()
    timm_bce = BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)
    expected = timm_bce(logits, labels)
    assert torch.allclose(bce_loss(logits, labels, smoothing, threshold), expected, atol=1e-6)
    assert torch.allclose(training_loss("bce", logits, labels, smoothing, threshold), expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_bce_on_mixup_targets_equals_timm(smoothing, threshold) -> None:
    """timm smooths inside its Mixup (mixup_target) and hands BinaryCrossEntropy dense targets,
    which it does not smooth again; ours get torchvision's unsmoothed mixed targets and smooth
    them in the loss: the same numbers. lam 0.7 puts the smaller share (0.3) above the 0.2
    threshold, so thresholding makes both classes 1."""
    logits, labels = logits_and_labels()
    timm_targets = mixup_target(labels, CLASSES, lam=0.7, smoothing=smoothing)
    expected = BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)(
        logits, timm_targets
    )
    ours = bce_loss(logits, mixed_pairs(labels, 0.7), smoothing, threshold)
    assert torch.allclose(ours, expected, atol=1e-6)
    if threshold is not None:
        binary = smoothed_targets(mixed_pairs(labels, 0.7), CLASSES, smoothing).gt(threshold)
        assert torch.equal(binary.sum(1), torch.where(labels == labels.flip(0), 1, 2))


def test_bce_reduction_is_the_mean_over_batch_and_classes() -> None:
    logits, labels = logits_and_labels()
    per_element = F.binary_cross_entropy_with_logits(
        logits, F.one_hot(labels, CLASSES).float(), reduction="none"
    )
    assert torch.allclose(bce_loss(logits, labels), per_element.mean())
    assert not torch.allclose(bce_loss(logits, labels), per_element.sum(1).mean())


def test_ce_with_smoothing_matches_timm_on_soft_targets() -> None:
    """CE's smoothing of soft targets is the same t * (1 - s) + s / classes as BCE's."""
    logits, labels = logits_and_labels()
    expected = SoftTargetCrossEntropy()(logits, mixup_target(labels, CLASSES, 0.7, 0.1))
    assert torch.allclose(training_loss("ce", logits, mixed_pairs(labels, 0.7), 0.1), expected)
    assert torch.equal(training_loss("ce", logits, labels), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="loss 'mse': must be one of ce, bce"):
        training_loss("mse", logits, labels)


@pytest.mark.parametrize("mix", [False, True])
def test_model_step_trains_on_the_recipes_loss(mix) -> None:
    """The step's loss is BCE of the model's logits on the (mixed) targets, not CE."""
    x, labels = torch.randn(6, 3, 8, 8), torch.arange(6) % CLASSES
    losses = {}
    for loss in ("ce", "bce"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4, CLASSES),
        )
        trainer = ModelStep(
            model,
            build_optimizer(model, Recipe(), CPU),
            CPU,
            "fp32",
            label_smoothing=0.1,
            mix=make_mix(0.0, 1.0, CLASSES) if mix else None,
            loss=loss,
            bce_target_threshold=0.2 if loss == "bce" else None,
        )
        inputs, targets = x, labels
        if trainer.mix is not None:
            with seeded(3, CPU):  # the step draws its mix under the same seed
                inputs, targets = trainer.mix(x, labels)
        with torch.no_grad():
            logits = model(inputs)
        losses[loss] = trainer.step(x, labels, 0.1, seed=3)
    assert torch.allclose(losses["bce"], bce_loss(logits, targets, 0.1, 0.2))
    assert targets.ndim == (2 if mix else 1)
    assert not torch.allclose(losses["bce"], losses["ce"])
    assert 0 < losses["bce"] < 1 < losses["ce"]  # BCE over 7 sigmoids vs CE over a softmax


def test_a_bce_run_with_a_timm_optimizer_trains_and_checkpoints(tmp_path) -> None:
    """`train run` end to end with the new keys: the step's loss is BCE (a per-class mean),
    the checkpoint holds timm's optimizer state."""
    optimizer = "lamb"  # lars's checkpoint round trip: test_optim
    recipe = {
        "arch": "resnet18",
        "optimizer": optimizer,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "loss": "bce",
        "bce_target_threshold": 0.2,
        "cutmix_alpha": 1.0,
    }
    phase = {"epochs": [0, 1], "prep_size": 160, "crop_size": 32, "batch_size": 8, "lr": 0.01}
    phases = tmp_path / "p.json"
    phases.write_text(json.dumps({"recipe": recipe, "phases": [phase]}))
    config = RunConfig(
        phases, out_dir=tmp_path / "run", device="cpu", progress=False, tensorboard=False
    )
    run(config, StandInData(num_train=16, num_val=6))
    (record,) = read_metrics(tmp_path / "run")
    # BCE over 3 sigmoids sits near log(2) = 0.69 at init; CE at chance would be log(3) = 1.10
    assert 0.5 < record["train_loss"] < 1.0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert saved["recipe"]["optimizer"] == optimizer and saved["optimizer"]["state"]

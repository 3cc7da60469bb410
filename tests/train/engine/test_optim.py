"""The optimizers (sgd, adamw, lamb, lars): parameter groups, each update against its formula,
MLPerf's LARS exclusion, the recipe checks of their keys, their state through a checkpoint, and
the dry run's optimizer line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.train.run.test_resume import assert_bit_identical
from train.engine.build import build_trainer
from train.engine.dist import DistEnv
from train.engine.loop import TrainState
from train.engine.model import build_model
from train.engine.optim import build_optimizer, fused_option, implementation, param_groups, set_lr
from train.engine.step import ModelStep
from train.errors import RecipeError
from train.plan.config import OPTIMIZERS, Recipe, RunConfig
from train.plan.dry_run import optimizer_line
from train.run import checkpoint

CPU = torch.device("cpu")
LR = 0.5


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
    )


def step_with_grads(
    model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0, scale: float = 1.0
):
    """One optimizer step at LR on seeded random gradients; (weights before, grads)."""
    generator = torch.Generator().manual_seed(seed)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {}
    for name, p in model.named_parameters():
        p.grad = scale * torch.randn(p.shape, generator=generator)
        grads[name] = p.grad.clone()
    set_lr(optimizer, LR)
    optimizer.step()
    return before, grads


def test_no_weight_decay_on_bn_and_bias() -> None:
    model = build_model(Recipe(arch="resnet18"), num_classes=3)
    decay, no_decay = param_groups(model, 5e-5, bn_weight_decay=False)
    assert decay["weight_decay"] == 5e-5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.fc.bias for p in no_decay["params"])
    assert any(p is model.bn1.weight for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (everything,) = param_groups(model, 5e-5, bn_weight_decay=True)
    assert len(everything["params"]) == len(list(model.parameters()))
    assert "always_adapt" not in decay  # torch's optimizers get no timm keys
    decay, no_decay = param_groups(model, 0.0, bn_weight_decay=False, layerwise=True)
    assert decay["always_adapt"] and not no_decay["always_adapt"]


def test_sgd_nesterov_update_and_fused_kernels() -> None:
    model = tiny_model()
    optimizer = build_optimizer(model, Recipe(momentum=0.8, nesterov=True, weight_decay=0), CPU)
    assert isinstance(optimizer, torch.optim.SGD)
    w0, g1 = step_with_grads(model, optimizer)
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, g2 = step_with_grads(model, optimizer, seed=1)
    for name, p in model.named_parameters():
        buf1 = g1[name]  # torch's first momentum buffer is the gradient itself
        assert torch.allclose(w1[name], w0[name] - LR * (g1[name] + 0.8 * buf1), atol=1e-6)
        buf2 = 0.8 * buf1 + g2[name]
        assert torch.allclose(p, w1[name] - LR * (g2[name] + 0.8 * buf2), atol=1e-6)
    # Fused where this torch has the kernels (CPU too since torch 2.4: both our pins), torch's
    # default where it has none (the meta device has none); never an error.
    assert implementation(optimizer) == "fused" and fused_option(torch.optim.SGD, CPU)
    assert fused_option(torch.optim.AdamW, torch.device("meta")) == {}


def test_adamw_decouples_decay_and_honours_betas_and_eps() -> None:
    model = tiny_model()
    recipe = Recipe(optimizer="adamw", betas=(0.8, 0.9), eps=0.5, weight_decay=0.1)
    optimizer = build_optimizer(model, recipe, CPU)
    assert isinstance(optimizer, torch.optim.AdamW)
    w0, g = step_with_grads(model, optimizer)
    for name, p in model.named_parameters():
        # First step: bias-corrected moments are g and g^2, so the Adam step is g / (|g| + eps).
        decay = 0.1 if p.ndim > 1 else 0.0  # decoupled: w * (1 - lr * wd), not on BN/bias
        expected = w0[name] * (1 - LR * decay) - LR * g[name] / (g[name].abs() + 0.5)
        assert torch.allclose(p, expected, atol=1e-6), name


def test_lars_adapts_weights_and_leaves_bn_and_bias_to_plain_momentum_sgd() -> None:
    """MLPerf's exclusion: 1-D parameters (BN, biases) get no weight decay and no trust ratio,
    so their update is exactly momentum SGD's; conv/linear weights are scaled by the trust
    ratio eta * |w| / (|g| + wd * |w| + eps)."""
    model, reference = tiny_model(), tiny_model()
    recipe = Recipe(optimizer="lars", weight_decay=0.01, trust_coefficient=0.02, momentum=0.9)
    optimizer = build_optimizer(model, recipe, CPU)
    excluded = [p for p in reference.parameters() if p.ndim == 1]
    sgd = torch.optim.SGD(excluded, lr=LR, momentum=0.9)
    w0, g = {}, {}
    for seed in range(2):
        w0, g = step_with_grads(model, optimizer, seed)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            q.grad = g[name].clone()
        sgd.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.ndim == 1:
            assert torch.allclose(p, q, atol=1e-6), name
    # The conv weight's first step (fresh state: the momentum buffer is the adapted gradient).
    model = tiny_model()
    optimizer = build_optimizer(model, recipe, CPU)
    w0, g = step_with_grads(model, optimizer)
    w, grad = w0["0.weight"], g["0.weight"]
    trust = 0.02 * w.norm() / (grad.norm() + 0.01 * w.norm() + recipe.eps)
    expected = w - LR * trust * (grad + 0.01 * w)
    assert torch.allclose(model[0].weight, expected, atol=1e-6)
    assert not torch.allclose(model[0].weight, w - LR * (grad + 0.01 * w), atol=1e-3)


@pytest.mark.parametrize("bn_weight_decay", [False, True])
def test_lars_adaptation_follows_the_groups_not_the_decay_value(bn_weight_decay) -> None:
    """weight_decay 0 still adapts the weights (timm's own rule would adapt nothing);
    bn_weight_decay true decays and adapts every parameter (LARS without the exclusion)."""
    wd = 0.0 if not bn_weight_decay else 0.01
    recipe = Recipe(optimizer="lars", weight_decay=wd, bn_weight_decay=bn_weight_decay)
    model = tiny_model()
    w0, g = step_with_grads(model, build_optimizer(model, recipe, CPU))
    for name, p in model.named_parameters():
        w, grad = w0[name], g[name]
        if p.ndim > 1 or bn_weight_decay:
            trust = recipe.trust_coefficient * w.norm() / (grad.norm() + wd * w.norm() + 1e-8)
            trust = trust if w.norm() > 0 else 1.0  # a zero tensor (BN bias at init): 1
            expected = w - LR * trust * (grad + wd * w)
        else:
            expected = w - LR * grad
        assert torch.allclose(p, expected, atol=1e-6), name


def test_lamb_trust_ratio_exclusion_and_no_hidden_clip() -> None:
    """LAMB's step: the Adam direction (plus decay) scaled so that |dw| = lr * |w| for
    conv/linear weights; BN and biases get the plain Adam step. Gradients of global norm
    ~500 pass unclipped: timm's own max_grad_norm=1.0 is off (grad_clip stands in for it),
    which eps=0.5 makes visible: g / (|g| + eps) changes a lot when g is divided by 500."""
    model = tiny_model()
    recipe = Recipe(optimizer="lamb", betas=(0.8, 0.9), eps=0.5, weight_decay=0.1)
    optimizer = build_optimizer(model, recipe, CPU)
    w0, g = step_with_grads(model, optimizer, scale=100.0)
    assert sum(v.norm() ** 2 for v in g.values()) ** 0.5 > 100
    for name, p in model.named_parameters():
        adam = g[name] / (g[name].abs() + 0.5)
        if p.ndim == 1:
            assert torch.allclose(p, w0[name] - LR * adam, atol=1e-6), name
        else:
            update = adam + 0.1 * w0[name]
            expected = w0[name] - LR * w0[name].norm() / update.norm() * update
            assert torch.allclose(p, expected, atol=1e-6), name
            assert torch.allclose((w0[name] - p).norm(), LR * w0[name].norm(), rtol=1e-5)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"betas": [0.9, 0.99]}, "'betas': optimizer 'sgd' does not use it (it reads momentum"),
        ({"optimizer": "adamw", "trust_coefficient": 0.01}, "'trust_coefficient': optimizer"),
        ({"optimizer": "adamw", "nesterov": True}, "'nesterov': optimizer 'adamw' does not"),
        ({"optimizer": "lamb", "momentum": 0.8}, "'momentum': optimizer 'lamb' does not"),
        ({"optimizer": "sgd", "eps": 1e-6}, "'eps': optimizer 'sgd' does not use it"),
        ({"loss": "ce", "bce_target_threshold": 0.2}, "only applies to loss 'bce'"),
        ({"optimizer": "lars", "betas": [0.9, 0.99, 0.9]}, "'betas': must be two numbers"),
    ],
)
def test_keys_the_optimizer_does_not_read_are_refused(recipe, message) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        Recipe.from_mapping(recipe)


def test_keys_the_optimizer_reads_and_defaults_pass() -> None:
    lars = Recipe.from_mapping(
        {"optimizer": "lars", "momentum": 0.9, "eps": 0.0001, "trust_coefficient": 0.02}
    )
    assert (lars.eps, lars.trust_coefficient, lars.betas) == (0.0001, 0.02, (0.9, 0.999))
    lamb = Recipe.from_mapping({"optimizer": "lamb", "betas": [0.9, 0.99], "grad_clip": 1})
    assert lamb.betas == (0.9, 0.99) and lamb.grad_clip == 1
    # The defaults of momentum/nesterov/trust_coefficient are not "given": adamw alone passes;
    # nor does a key at its default change anything: a full dump (to_dict) reads back.
    assert Recipe.from_mapping({"optimizer": "adamw"}).momentum == 0.9
    assert Recipe.from_mapping({"optimizer": "adamw", "momentum": 0.9}).optimizer == "adamw"
    for recipe in (Recipe(), lamb, lars):
        assert Recipe.from_mapping(recipe.to_dict()) == recipe
    bce = Recipe.from_mapping({"loss": "bce", "bce_target_threshold": 0.2})
    assert bce.bce_target_threshold == 0.2


@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_timm_optimizers_without_timm_fail_at_the_recipe_check(monkeypatch, optimizer) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # find_spec sees no timm
    with pytest.raises(RecipeError, match=f"'optimizer': '{optimizer}' is timm's and needs it"):
        Recipe.from_mapping({"optimizer": optimizer})
    assert Recipe.from_mapping({"optimizer": "adamw"}).optimizer == "adamw"


def test_build_trainer_passes_loss_clip_and_optimizer(tmp_path: Path) -> None:
    recipe = Recipe(
        arch="resnet18", optimizer="lamb", grad_clip=2.0, loss="bce", bce_target_threshold=0.3
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU, backend=None)
    trainer = build_trainer(RunConfig(tmp_path / "p.json"), recipe, env, 5, "fp32")
    assert type(trainer.optimizer).__name__ == "Lamb"
    assert (trainer.loss, trainer.bce_target_threshold, trainer.grad_clip) == ("bce", 0.3, 2.0)


def train_steps_of(trainer: ModelStep, first: int, count: int) -> None:
    for step in range(first, first + count):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, 8, 8, generator=generator)
        trainer.step(x, torch.tensor([0, 1, 2, 3]), 0.05 * (step + 1))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_resumes_bit_exact_through_a_checkpoint(tmp_path: Path, name) -> None:
    """3 steps, a checkpoint (save, weights-only load, restore into a fresh model), 3 more:
    weights and optimizer state bit-identical to 6 uninterrupted steps."""

    def trainer() -> ModelStep:
        model = tiny_model()
        recipe = Recipe(optimizer=name, weight_decay=0.01, grad_clip=1.0)
        return ModelStep(model, build_optimizer(model, recipe, CPU), CPU, "fp32", grad_clip=1.0)

    straight, first = trainer(), trainer()
    train_steps_of(straight, 0, 6)
    train_steps_of(first, 0, 3)
    identity = {key: 0 for key in checkpoint.IDENTITY_KEYS} | {"recipe": {}, "schedule": []}
    path = checkpoint.save_atomic(
        checkpoint.capture(TrainState(global_step=3), first, identity, 0.0), tmp_path / "c.pt"
    )
    resumed = trainer()
    checkpoint.restore(checkpoint.load(path), TrainState(), resumed)
    train_steps_of(resumed, 3, 3)
    assert_bit_identical(resumed.optimizer.state_dict(), straight.optimizer.state_dict())
    assert_bit_identical(resumed.model.state_dict(), straight.model.state_dict())
    assert len(straight.optimizer.state) == len(list(straight.model.parameters()))


def test_dry_run_names_the_optimizer_its_keys_clip_and_loss() -> None:
    lamb = Recipe(optimizer="lamb", eps=1e-6, grad_clip=1.0, loss="bce", bce_target_threshold=0.2)
    line = optimizer_line(lamb)
    assert line.startswith("optimizer: lamb (betas=(0.9, 0.999), eps=1e-06, weight_decay=5e-05")
    assert "no decay or trust ratio on BN and biases" in line and "momentum" not in line
    assert "grad_clip=1 (global norm); loss=bce (targets above 0.2 -> 1)" in line
    sgd = optimizer_line(Recipe(bn_weight_decay=True))
    assert "momentum=0.9, nesterov=False, weight_decay=5e-05)" in sgd and "no grad_clip" in sgd

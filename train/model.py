"""Model, optimizer and the recipe that configures them.

A phases file's "recipe" object is the contract for trainer settings (arch, optimizer,
weight decay, label smoothing, zero-init, ...). `Recipe.from_mapping` checks it here, at the
boundary, so a typo fails at start-up instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


class RecipeError(ValueError):
    """A recipe key the trainer cannot use; the message is one line naming the key."""


@dataclass(frozen=True)
class Recipe:
    """Trainer settings from phases.json's "recipe", with command-line overrides applied."""

    arch: str = "resnet50"
    tuned_num_gpus: int | None = None  # world size the LRs were tuned for (None: unknown)
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-5
    bn_weight_decay: bool = False  # False: no decay on BatchNorm weights/biases nor any bias
    label_smoothing: float = 0.0
    zero_init_residual: bool = True  # last BN gamma of each residual block starts at 0
    blurpool: bool = False  # accepted for FFCV recipes; not implemented (the run warns)
    val_flip_tta: bool = False  # average logits with the flipped image at the final eval
    mixup_alpha: float = 0.0  # 0 = off (torchvision transforms.v2.MixUp on the GPU batch)
    cutmix_alpha: float = 0.0  # 0 = off; with both on, each batch picks one at random
    ema_decay: float = 0.0  # 0 = off; else an EMA of the weights is kept and evaluated too
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra constructor args
    targets: Mapping[str, float] = field(default_factory=dict)  # {"top1": 75.9, "top5": 93}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> Recipe:
        """Check types and ranges; `overrides` whose value is None are ignored."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecipeError(f"recipe key {unknown[0]!r}: unknown; allowed: "
                              f"{', '.join(known)}")
        values = dict(data)
        values.update({k: v for k, v in overrides.items() if v is not None})
        recipe = cls(**values)
        recipe._check()
        return recipe

    def _check(self) -> None:
        def fail(key: str, message: str) -> None:
            raise RecipeError(f"recipe key {key!r}: {message}, got {getattr(self, key)!r}")

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.arch, str) or self.arch not in classification_archs():
            fail("arch", "must name a torchvision classification model (resnet18, resnet50, ...)")
        if self.tuned_num_gpus is not None and (not isinstance(self.tuned_num_gpus, int)
                                                or self.tuned_num_gpus < 1):
            fail("tuned_num_gpus", "must be a positive integer")
        if self.optimizer != "sgd":
            fail("optimizer", "only 'sgd' is implemented")
        for key in ("nesterov", "bn_weight_decay", "zero_init_residual", "blurpool",
                    "val_flip_tta"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "must be true or false")
        for key, upper in (("momentum", 1.0), ("weight_decay", math.inf),
                           ("label_smoothing", 1.0), ("mixup_alpha", math.inf),
                           ("cutmix_alpha", math.inf), ("ema_decay", 1.0)):
            value = getattr(self, key)
            if not number(value) or not 0 <= value < upper:
                fail(key, f"must be a number in [0, {upper:g})")
        if not isinstance(self.model_kwargs, Mapping):
            fail("model_kwargs", "must be an object")
        if not isinstance(self.targets, Mapping) or not all(
                k in ("top1", "top5") and number(v) for k, v in self.targets.items()):
            fail("targets", 'must be an object like {"top1": 75.9, "top5": 93.0}')

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_kwargs"] = dict(self.model_kwargs)
        out["targets"] = dict(self.targets)
        return out


def classification_archs() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision model; seed torch's RNG first for a repeatable init."""
    model = torchvision.models.get_model(recipe.arch, weights=None, num_classes=num_classes,
                                         **dict(recipe.model_kwargs))
    if recipe.zero_init_residual:
        zero_init_last_bn(model)
    return model


def zero_init_last_bn(model: nn.Module) -> int:
    """Zero the last BN gamma of each ResNet block, so each block starts as the identity.

    Goyal et al. 2017, used by imagenet18 and torchvision (`zero_init_residual`). Returns how
    many blocks were found: 0 means the arch has no torchvision ResNet blocks and is unchanged.
    """
    count = 0
    for module in model.modules():
        last_bn = {Bottleneck: "bn3", BasicBlock: "bn2"}.get(type(module))
        if last_bn is not None:
            nn.init.zeros_(getattr(module, last_bn).weight)
            count += 1
    return count


def param_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool) -> list[dict]:
    """Weight decay on conv/linear weights only, unless bn_weight_decay asks for it everywhere.

    One-dimensional parameters are exactly the BatchNorm/LayerNorm weights and biases and the
    layer biases: decaying them only shrinks the scale the next layer undoes (imagenet18, FFCV).
    """
    if bn_weight_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum; fused kernels on CUDA (one launch for all params), default on CPU.

    The LR is set before every step from the schedule, so the constructor's lr is a placeholder.
    """
    groups = param_groups(model, recipe.weight_decay, recipe.bn_weight_decay)
    kwargs: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.SGD(groups, lr=0.0, momentum=recipe.momentum, nesterov=recipe.nesterov,
                           **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's and DDP's wrappers (whose state_dict keys are
    prefixed `_orig_mod.` and `module.`)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model

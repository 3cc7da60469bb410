"""The recipe's optimizer over its parameter groups: torch's SGD and AdamW, timm's LAMB and LARS
(docs/DESIGN.md, "Optimizers, gradient clipping and the BCE loss": why timm's, and how MLPerf's
LARS exclusion maps onto them)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from train.plan.config import TIMM_OPTIMIZERS, Recipe


def param_groups(
    model: nn.Module, weight_decay: float, bn_weight_decay: bool, layerwise: bool = False
) -> list[dict]:
    """Weight decay on conv/linear weights only, unless bn_weight_decay asks for it everywhere.

    One-dimensional parameters are exactly the BatchNorm/LayerNorm weights and biases and the
    layer biases: decaying them only shrinks the scale the next layer undoes (imagenet18, FFCV).
    `layerwise` (LAMB, LARS): the decayed group is also trust-ratio adapted and the excluded one
    is not (MLPerf's LARS exclusion), whatever the weight decay's value; timm's own rule, adapt
    where weight_decay != 0, would stop adapting everything at weight_decay 0.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]

    def adapt(on: bool) -> dict[str, Any]:
        return {"always_adapt": on} if layerwise else {}

    if bn_weight_decay:
        return [{"params": trainable, "weight_decay": weight_decay, **adapt(True)}]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay, **adapt(True)},
        {"params": no_decay, "weight_decay": 0.0, **adapt(False)},
    ]


def fused_option(make: Callable[..., torch.optim.Optimizer], device: torch.device) -> dict:
    """{"fused": True} where this torch has fused kernels for `make` on `device` (CUDA; the CPU
    too in torch >= 2.4, 2-4x faster there than its for-loop, docs/DESIGN.md), else {}: torch's
    default (foreach on CUDA, for-loop on CPU). Probed by one step on a one-element tensor (torch
    checks the device at construction in some versions, at the first step in others)."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        make([probe], lr=0.0, fused=True).step()
    except (RuntimeError, ValueError, TypeError, NotImplementedError):  # "requires ... devices"
        return {}
    return {"fused": True}


def build_optimizer(
    model: nn.Module, recipe: Recipe, device: torch.device
) -> torch.optim.Optimizer:
    """The recipe's optimizer with the recipe's hyperparameters. The LR is set before every step
    from the schedule, so the constructor's lr is a placeholder."""
    groups = param_groups(
        model, recipe.weight_decay, recipe.bn_weight_decay, recipe.optimizer in TIMM_OPTIMIZERS
    )
    if recipe.optimizer in TIMM_OPTIMIZERS:  # layer-wise trust ratios
        from timm.optim import Lamb, Lars  # the recipe check made sure timm is there

        if recipe.optimizer == "lamb":
            # Lamb's own global-norm clip (max_grad_norm=1.0 by default) is off: grad_clip,
            # applied in ModelStep for every optimizer, stands in for it.
            return Lamb(groups, lr=0.0, betas=recipe.betas, eps=recipe.eps, max_grad_norm=None)
        return Lars(
            groups,
            lr=0.0,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            trust_coeff=recipe.trust_coefficient,
            eps=recipe.eps,
        )
    if recipe.optimizer == "adamw":
        make: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW
        hyper: dict[str, Any] = {"betas": recipe.betas, "eps": recipe.eps}
    else:
        make = torch.optim.SGD
        hyper = {"momentum": recipe.momentum, "nesterov": recipe.nesterov}
    return make(groups, lr=0.0, **hyper, **fused_option(make, device))


def implementation(optimizer: torch.optim.Optimizer) -> str:
    """'fused', or 'default' (foreach on CUDA, for-loop on CPU): its kernels, for bench rows."""
    return "fused" if optimizer.defaults.get("fused") else "default"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

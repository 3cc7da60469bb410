"""The model: torchvision or timm, with the recipe's init and layers (its optimizer: optim.py)."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
import torchvision
from torch import nn

from train.engine.layers import (
    LAST_BN,
    add_blurpool,
    add_drop_path,
    count_blurpool,
    zero_init_last_bn,
)
from train.errors import RecipeError, one_line
from train.plan.config import TIMM_PREFIX, Recipe


def create_model(
    arch: str,
    num_classes: int,
    model_kwargs: Mapping[str, Any] | None = None,
    drop_path: float = 0.0,
) -> nn.Module:
    """The bare constructor: torchvision's `get_model`, or `timm.create_model` (no weights)."""
    kwargs = dict(model_kwargs or {})
    if arch.startswith(TIMM_PREFIX):
        import timm

        if drop_path:
            kwargs.setdefault("drop_path_rate", drop_path)  # timm's own stochastic depth
        return timm.create_model(
            arch[len(TIMM_PREFIX) :], pretrained=False, num_classes=num_classes, **kwargs
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """A randomly initialised model; seed torch's RNG first for a repeatable init."""
    model = create_model(recipe.arch, num_classes, recipe.model_kwargs, recipe.drop_path)
    if recipe.zero_init_residual and not recipe.is_timm:  # timm's ResNets do it themselves
        zero_init_last_bn(model)
    if recipe.drop_path and not recipe.is_timm:
        add_drop_path(model, recipe.drop_path)
    if recipe.blurpool:
        add_blurpool(model)
    return model


def check_model(
    recipe: Recipe, num_classes: int, train_crops: list[int], val_crops: list[int]
) -> None:
    """Build the recipe's model and run it at each crop size it will see, on the meta device
    (shapes only: no memory, no arithmetic), so a bad `model_kwargs` or a crop the arch cannot
    take fails now, in one line, not after the data and process group are up. RecipeError on
    failure; an arch that cannot be built or run on meta is built on the CPU instead / not run.
    """
    try:
        with warnings.catch_warnings():  # the real build, later, says them once
            warnings.simplefilter("ignore")
            try:
                with torch.device("meta"):
                    model = build_model(recipe, num_classes)
            except NotImplementedError:  # meta cannot run every init (regnet reads a tensor)
                build_model(recipe, num_classes)
                return
    except Exception as exc:  # a constructor says TypeError, ValueError, AssertionError, ...
        raise RecipeError(
            f"recipe: cannot build {recipe.arch} with model_kwargs "
            f"{dict(recipe.model_kwargs)} ({one_line(exc)})"
        ) from None
    for training, crops in ((True, sorted(set(train_crops))), (False, sorted(set(val_crops)))):
        model.train(training)
        for crop_size in {crops[0], crops[-1]} if crops else ():
            try:
                logits = model(torch.empty(2, 3, crop_size, crop_size, device="meta"))
            except NotImplementedError:  # an op without a meta kernel: cannot tell here
                return
            except Exception as exc:
                raise RecipeError(
                    f"recipe: {recipe.arch} cannot take {crop_size} px crops ({one_line(exc)})"
                ) from None
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
                kind = (
                    type(logits).__name__
                    if not isinstance(logits, torch.Tensor)
                    else f"shape {tuple(logits.shape)}"
                )
                raise RecipeError(
                    f"recipe: {recipe.arch} returns {kind} in "
                    f"{'training' if training else 'eval'} mode, not "
                    f"(batch, {num_classes}) logits (an auxiliary head? see "
                    "its model_kwargs)"
                )


def model_notes(recipe: Recipe, model: nn.Module) -> list[str]:
    """What the recipe asked for that this arch does not have (printed, not fatal)."""
    notes = []
    if recipe.zero_init_residual and not recipe.is_timm:
        if not any(type(m) in LAST_BN for m in model.modules()):
            notes.append(
                f"note: zero_init_residual has no effect on {recipe.arch} (no ResNet blocks)"
            )
    if recipe.zero_init_residual and recipe.is_timm:
        notes.append(
            "note: timm models keep timm's own init (its ResNets zero-init the last "
            "BN of each block: model_kwargs zero_init_last)"
        )
    if recipe.blurpool and count_blurpool(model) == 0:
        notes.append(
            f"note: blurpool has no effect on {recipe.arch} (no subsampling conv "
            "with >= 16 input channels)"
        )
    return notes

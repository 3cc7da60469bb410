"""The training loss: softmax cross-entropy ("ce") or per-class sigmoid BCE ("bce", as timm's
"ResNet strikes back" recipes train). Pure functions of logits and targets; validation stays CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.plan.config import LOSSES


def smoothed_targets(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(batch, classes) float targets: class indices one-hot, soft (mixup/cutmix) ones as given,
    then label smoothing, t * (1 - s) + s / classes. That equals timm's one-hot with
    off = s / classes, on = 1 - s + off, and its mixup_target's smoothing of mixed pairs."""
    if targets.ndim == 1:
        targets = F.one_hot(targets.long(), num_classes)
    targets = targets.float()
    return targets * (1.0 - smoothing) + smoothing / num_classes if smoothing else targets


def bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float = 0.0,
    target_threshold: float | None = None,
) -> torch.Tensor:
    """timm.loss.BinaryCrossEntropy (reduction 'mean', sum_classes False): targets smoothed,
    then, with a threshold, 1 above it and 0 elsewhere; the mean over batch x classes."""
    dense = smoothed_targets(targets, logits.shape[-1], smoothing)
    if target_threshold is not None:
        dense = dense.gt(target_threshold).float()
    return F.binary_cross_entropy_with_logits(logits.float(), dense)


def training_loss(
    kind: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float = 0.0,
    target_threshold: float | None = None,
) -> torch.Tensor:
    """The recipe's `loss` on fp32 logits; `targets` are class indices or (batch, classes)."""
    if kind == "ce":
        return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
    if kind == "bce":
        return bce_loss(logits, targets, smoothing, target_threshold)
    raise ValueError(f"loss {kind!r}: must be one of {', '.join(LOSSES)}")

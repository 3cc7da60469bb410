"""One training step and one evaluation pass: autocast, grad scaler, mixup/cutmix, EMA, top-k.

No loaders, files or schedule here: callers hand in normalized batches `x` already on the
device and the LR of the step, which keeps these functions usable by `train run`, `train bench`
and the tests alike.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from train.model import set_lr

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class PrecisionError(ValueError):
    pass


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (no loss scaling needed), fp32 on CPU (exact, deterministic)."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionError("fp16 needs CUDA; on CPU use fp32 or bf16")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for fp16 only: imagenet18's static scale is what produced NaNs."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def make_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """transforms.v2 MixUp/CutMix (one of them per batch when both are on), or None."""
    if not mixup_alpha and not cutmix_alpha:
        return None
    from torchvision.transforms import v2

    choices = []
    if mixup_alpha:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, step, rank): resume-proof randomness."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Trainer:
    """What a training step needs; `model` may be DDP- and/or compile-wrapped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    label_smoothing: float = 0.0
    scaler: torch.amp.GradScaler | None = None
    mix: Callable | None = None
    ema: nn.Module | None = None  # torch.optim.swa_utils.AveragedModel of the plain module
    ema_source: nn.Module | None = None  # the plain module the EMA follows

    def step(self, x: torch.Tensor, labels: torch.Tensor, lr: float,
             mix_seed: int | None = None) -> torch.Tensor:
        """One optimizer step at `lr`; returns the detached loss (no host sync)."""
        set_lr(self.optimizer, lr)
        targets = labels
        if self.mix is not None:
            # fork_rng: the draw is seeded per step and leaves the global CPU stream untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed if mix_seed is not None else 0)
                x, targets = self.mix(x, labels)
        with autocast(self.device, self.precision):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.ema_source)
        return loss.detach()


@dataclass
class EvalSums:
    """Counts summed over a pass (and, after all_reduce, over ranks): exact top-k."""

    correct1: float = 0.0
    correct5: float = 0.0
    count: float = 0.0
    loss_sum: float = 0.0

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.correct1, self.correct5, self.count, self.loss_sum],
                            dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> EvalSums:
        return cls(*values.tolist())

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / self.count if self.count else float("nan")

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / self.count if self.count else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, precision: str, flip: bool = False) -> torch.Tensor:
    """Sum of top-1/top-5 hits, count and loss over this rank's batches, as a device tensor.

    Pass the PLAIN module (not DDP): its forward has no collectives, so a rank whose batch is
    empty simply skips it, and the caller all-reduces the sums once. `flip` averages the
    logits of each image and its mirror image (test-time augmentation).
    """
    was_training = module.training
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for x, labels in batches:
        if x.shape[0] == 0:
            continue
        with autocast(device, precision):
            logits = module(x)
            if flip:
                logits = logits + module(torch.flip(x, dims=[3]))
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels.view(-1, 1)
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += labels.shape[0]
        sums[3] += F.cross_entropy(logits / (2 if flip else 1), labels, reduction="sum")
    module.train(was_training)
    return sums

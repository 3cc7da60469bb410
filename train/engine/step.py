"""One optimizer step: autocast, grad scaler, mixup/cutmix, accumulation, grad clipping, EMA;
seeded per step."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from train.engine.loss import training_loss
from train.engine.optim import set_lr
from train.errors import TrainError
from train.plan.config import PRECISIONS


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (no loss scaling needed), fp32 on CPU (exact, deterministic)."""
    if precision not in PRECISIONS:
        raise TrainError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainError("fp16 needs CUDA; on CPU use fp32 or bf16")
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


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Torch's CPU (and `device`'s) generator seeded with `seed`, restored afterwards."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@dataclass
class ModelStep:
    """What a training step needs; `model` may be DDP- and/or compile-wrapped, `module` is
    the plain model under it (None: `model` is plain) and `ddp` the DDP wrapper, if any."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    label_smoothing: float = 0.0
    scaler: torch.amp.GradScaler | None = None
    mix: Callable | None = None
    ema: nn.Module | None = None  # torch.optim.swa_utils.AveragedModel of the plain module
    module: nn.Module | None = None
    ddp: nn.parallel.DistributedDataParallel | None = None
    loss: str = "ce"  # train.engine.loss.training_loss's kind
    bce_target_threshold: float | None = None
    grad_clip: float = 0.0  # max global gradient norm (0: off)

    def step(
        self, x: torch.Tensor, labels: torch.Tensor, lr: float, seed: int | None = None
    ) -> torch.Tensor:
        """One optimizer step at `lr` on one batch; returns the detached loss (no host sync)."""
        return self.accumulate([(x, labels)], lr, [seed])

    def accumulate(
        self,
        micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        lr: float,
        seeds: Sequence[int | None],
    ) -> torch.Tensor:
        """One optimizer step at `lr` over several batches (their mean loss is returned)."""
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        count = len(micro_batches)
        total = None
        for index, ((x, labels), seed) in enumerate(zip(micro_batches, seeds, strict=True)):
            inner = index < count - 1 and self.ddp is not None
            with (
                self.ddp.no_sync() if inner else contextlib.nullcontext(),
                seeded(seed, self.device),
            ):
                loss = self._loss(x, labels)
                scaled = loss / count if count > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.grad_clip:
            self.clip_gradients()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module if self.module is not None else self.model)
        return total if count == 1 else total / count

    def clip_gradients(self) -> torch.Tensor:
        """Scale all gradients together so their global L2 norm is at most grad_clip; returns
        the norm before. Once per optimizer step, after accumulation and DDP's all-reduce (so
        every rank clips alike), on unscaled gradients (fp16: the scaler's unscale_ first)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return nn.utils.clip_grad_norm_(params, self.grad_clip)

    def _loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels
        if self.mix is not None:
            x, targets = self.mix(x, labels)
        with autocast(self.device, self.precision):
            logits = self.model(x)
        return self.loss_of(logits, targets)

    def loss_of(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return training_loss(
            self.loss, logits, targets, self.label_smoothing, self.bce_target_threshold
        )

    def warm_up(
        self,
        shapes: Sequence[tuple[int, int]],
        channels_last: bool,
        say: Callable[[str], None] = print,
    ) -> None:
        """Compile each (batch, crop) shape before the clock starts (torch.compile).

        A forward and backward per shape, no optimizer step; the plain module's state (BN
        statistics) is restored afterwards, so the warm-up leaves the model as it was.
        """
        plain = self.module if self.module is not None else self.model
        saved = {k: v.detach().clone() for k, v in plain.state_dict().items()}
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for batch_size, crop_size in sorted(set(shapes)):
            say(f"compiling for batch {batch_size} x {crop_size} px")
            x = torch.randn(batch_size, 3, crop_size, crop_size, device=self.device)
            labels = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            with autocast(self.device, self.precision):
                logits = self.model(x.contiguous(memory_format=memory_format))
            self.loss_of(logits, labels).backward()
            self.optimizer.zero_grad(set_to_none=True)
        plain.load_state_dict(saved)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

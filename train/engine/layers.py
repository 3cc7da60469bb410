"""BlurPool and stochastic depth as hooks: no new parameters or state_dict keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

BLUR_MIN_IN_CHANNELS = 16
BLUR_KERNEL = (1.0, 2.0, 1.0)
LAST_BN = {Bottleneck: "bn3", BasicBlock: "bn2"}  # the residual branch's last layer


def _blur_then_convolve(conv: nn.Conv2d, args: tuple) -> tuple:
    (x,) = args
    blurred = F.conv2d(x, conv.blur_filter.to(dtype=x.dtype), padding=1, groups=conv.in_channels)
    return (blurred,)


def add_blurpool(model: nn.Module) -> int:
    """Blur the input of every subsampling conv with >= 16 input channels; returns how many."""
    count = 0
    kernel = torch.tensor(BLUR_KERNEL)
    square = torch.outer(kernel, kernel) / kernel.sum() ** 2
    for module in model.modules():
        if (
            isinstance(module, nn.Conv2d)
            and max(module.stride) > 1
            and module.in_channels >= BLUR_MIN_IN_CHANNELS
            and not hasattr(module, "blur_filter")
        ):
            weight = module.weight
            blur = square.to(weight.device, weight.dtype).expand(module.in_channels, 1, 3, 3)
            module.register_buffer("blur_filter", blur.contiguous(), persistent=False)
            module.register_forward_pre_hook(_blur_then_convolve)
            count += 1
    return count


def count_blurpool(model: nn.Module) -> int:
    return sum(1 for module in model.modules() if hasattr(module, "blur_filter"))


class DropPath:
    """Forward hook: per-sample drop of a residual branch's output while training."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if not module.training or self.rate == 0.0:
            return None
        keep = 1.0 - self.rate
        shape = (output.shape[0],) + (1,) * (output.ndim - 1)
        mask = torch.empty(shape, dtype=output.dtype, device=output.device).bernoulli_(keep)
        return output * mask.div_(keep)


def add_drop_path(model: nn.Module, rate: float) -> list[float]:
    """Stochastic depth on every torchvision ResNet block; returns the per-block rates."""
    blocks = [module for module in model.modules() if type(module) in LAST_BN]
    rates = [rate * i / max(len(blocks) - 1, 1) for i in range(len(blocks))]
    for block, block_rate in zip(blocks, rates):
        getattr(block, LAST_BN[type(block)]).register_forward_hook(DropPath(block_rate))
    return rates


def zero_init_last_bn(model: nn.Module) -> int:
    """Zero the last BN gamma of each ResNet block, so each block starts as the identity.

    Goyal et al. 2017, used by imagenet18 and torchvision (`zero_init_residual`). Returns how
    many blocks were found: 0 means the arch has no torchvision ResNet blocks and is unchanged.
    """
    count = 0
    for module in model.modules():
        last_bn = LAST_BN.get(type(module))
        if last_bn is not None:
            nn.init.zeros_(getattr(module, last_bn).weight)
            count += 1
    return count

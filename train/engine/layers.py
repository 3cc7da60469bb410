"""BlurPool and stochastic depth, added to a built model with hooks: no new parameters and no
new state_dict keys, so the weights still load strictly into torchvision's constructor.

- `add_blurpool(model)`: FFCV's anti-aliased downsampling (Zhang 2019, "Making convolutional
  networks shift-invariant again"): every Conv2d that subsamples (stride > 1) and has at least
  16 input channels (so not the stem) first blurs its input with the fixed 3x3 binomial
  filter [1 2 1]^T [1 2 1] / 16, one channel at a time. The filter is a non-persistent buffer
  (it moves with `.to()`, is not saved). A model loaded from exported weights needs
  `add_blurpool` again to compute what the run evaluated.
- `add_drop_path(model, rate)`: stochastic depth for torchvision ResNets (Huang 2016): in
  training, each residual branch (the output of a block's last BatchNorm, before the identity
  is added) is dropped per sample with probability rising linearly with depth, 0 for the
  first block to `rate` for the last (timm's rule), and scaled by 1 / (1 - p) when kept.
  Evaluation is unchanged. The draws come from torch's global RNG, which the trainer seeds
  per step (train.engine.step), so they are the same after a resume.
"""

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
    blurred = F.conv2d(x, conv.blur_filter.to(dtype=x.dtype), padding=1,
                       groups=conv.in_channels)
    return (blurred,)


def add_blurpool(model: nn.Module) -> int:
    """Blur the input of every subsampling conv with >= 16 input channels; returns how many."""
    count = 0
    kernel = torch.tensor(BLUR_KERNEL)
    square = torch.outer(kernel, kernel) / kernel.sum() ** 2
    for module in model.modules():
        if (isinstance(module, nn.Conv2d) and max(module.stride) > 1
                and module.in_channels >= BLUR_MIN_IN_CHANNELS
                and not hasattr(module, "blur_filter")):
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

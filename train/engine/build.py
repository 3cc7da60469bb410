"""The `ModelStep` a run trains: model, EMA, optimizer, scaler, DDP and compile, and torch's
global settings (threads, determinism, TF32)."""

from __future__ import annotations

import random

import torch
from torch import nn

from train.engine.dist import DistEnv
from train.engine.launch import say
from train.engine.model import build_model, model_notes
from train.engine.optim import build_optimizer
from train.engine.step import ModelStep, make_mix, make_scaler
from train.errors import TrainError
from train.plan.config import Recipe, RunConfig


def configure_torch(config: RunConfig, device: torch.device) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    deterministic = (
        config.deterministic if config.deterministic is not None else device.type == "cpu"
    )
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left
        torch.backends.cudnn.allow_tf32 = True


def build_trainer(
    config: RunConfig,
    recipe: Recipe,
    env: DistEnv,
    num_classes: int,
    precision: str,
    apply_init: bool = True,
) -> ModelStep:
    """Model (same initial weights on every rank), EMA, optimizer, scaler, DDP, compile.
    apply_init=False (a resume) leaves the recipe's "init" weights out: the checkpoint wins."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)  # nothing draws from it; seeded, its saved state is the same too
    module = build_model(recipe, num_classes)
    for note in model_notes(recipe, module):
        say(note)
    if recipe.init and apply_init:  # before EMA and DDP: both start from these weights
        from train.engine.init_weights import init_from

        for note in init_from(module, recipe.init, recipe.arch):
            say(note)
    if config.sync_bn:
        if env.device.type != "cuda":
            raise TrainError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only)")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    module = module.to(env.device, memory_format=memory_format)
    ema = None
    if recipe.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(
            module, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay)
        )
    optimizer = build_optimizer(module, recipe, env.device)
    model, ddp = module, None
    if env.distributed:
        # Buffers (BN statistics) stay per rank while training; rank 0's are broadcast
        # before each evaluation and are what checkpoints hold.
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True
        )
    if config.compile:
        # Static shapes: one graph per (batch, crop), all warmed before timing, rather than
        # a slower dynamic-shape graph after the second shape.
        model = torch.compile(model, dynamic=False)
    return ModelStep(
        model,
        optimizer,
        env.device,
        precision,
        recipe.label_smoothing,
        make_scaler(env.device, precision),
        make_mix(recipe.mixup_alpha, recipe.cutmix_alpha, num_classes),
        ema,
        module,
        ddp,
        recipe.loss,
        recipe.bce_target_threshold,
        recipe.grad_clip,
    )

"""grad_clip in ModelStep: the global norm once per optimizer step, after accumulation, on unscaled
fp16 gradients; and every optimizer under CUDA's fp16 GradScaler with clipping (gpu)."""

from __future__ import annotations

import pytest
import torch

from tests.train.engine.test_optim import tiny_model
from train.engine.optim import build_optimizer, implementation
from train.engine.step import ModelStep
from train.plan.config import OPTIMIZERS, Recipe

CPU = torch.device("cpu")


def clipping_trainer(grad_clip: float, precision: str = "fp32") -> tuple[ModelStep, list]:
    """A tiny ModelStep whose optimizer records the gradients it steps with, and their norm."""
    model = tiny_model()
    optimizer = build_optimizer(model, Recipe(weight_decay=0), CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if precision == "fp16" else None
    trainer = ModelStep(model, optimizer, CPU, precision, scaler=scaler, grad_clip=grad_clip)
    seen: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    real_step = optimizer.step

    def recording_step(*args, **kwargs):
        # A fused optimizer under a GradScaler is handed scaled gradients and the scale to
        # divide by (None when unscale_ already ran): record what it will step with.
        scale = getattr(optimizer, "grad_scale", None)
        grads = [
            p.grad / scale if scale is not None else p.grad.clone() for p in model.parameters()
        ]
        seen.append((torch.stack([g.norm() for g in grads]).norm(), grads))
        return real_step(*args, **kwargs)

    optimizer.step = recording_step
    return trainer, seen


def batches(scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (scale * torch.randn(4, 3, 8, 8, generator=generator), torch.tensor([0, 1, 2, 3]))
        for _ in range(2)
    ]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_grad_clip_scales_the_global_norm_once_per_step(precision) -> None:
    """Above grad_clip the optimizer sees the accumulated gradient scaled to norm grad_clip (in
    its direction; clipping each micro-batch would change both); below, untouched. fp16: on
    unscaled gradients (clipping scaled ones would leave norm clip / 4096 after unscaling)."""
    micro = batches(scale=3.0)
    unclipped, seen_free = clipping_trainer(0.0, precision)
    unclipped.accumulate(micro, 0.1, [None, None])
    ((free_norm, free_grads),) = seen_free
    clip = float(free_norm) / 4
    clipped, seen = clipping_trainer(clip, precision)
    clipped.accumulate(micro, 0.1, [None, None])
    ((norm, grads),) = seen
    assert torch.allclose(norm, torch.tensor(clip), rtol=1e-4)
    for g, free in zip(grads, free_grads):
        assert torch.allclose(g, free / 4, rtol=1e-3, atol=1e-7)
    loose, seen_loose = clipping_trainer(float(free_norm) * 1.01, precision)
    loose.accumulate(micro, 0.1, [None, None])
    assert all(torch.equal(g, free) for g, free in zip(seen_loose[0][1], free_grads))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cuda_optimizers_with_fp16_scaler_and_clip(name) -> None:
    """On CUDA: torch's fused kernels (sgd, adamw) or timm's foreach ones under the fp16
    GradScaler, clipped on unscaled gradients; the first step's update is finite and the same
    as the fp32 step's to fp16 tolerance."""
    cuda = torch.device("cuda")
    updates = {}
    for precision in ("fp32", "fp16"):
        model = tiny_model().to(cuda)
        recipe = Recipe(optimizer=name, weight_decay=0.01, grad_clip=0.5)
        optimizer = build_optimizer(model, recipe, cuda)
        scaler = torch.amp.GradScaler("cuda", init_scale=256.0) if precision == "fp16" else None
        trainer = ModelStep(model, optimizer, cuda, precision, scaler=scaler, grad_clip=0.5)
        before = [p.detach().clone() for p in model.parameters()]
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(cuda)
        trainer.step(x, torch.tensor([0, 1, 2, 3], device=cuda), 0.1)
        updates[precision] = [p.detach() - b for p, b in zip(model.parameters(), before)]
    if name in ("sgd", "adamw"):
        assert implementation(optimizer) == "fused"
    for fp16, fp32 in zip(updates["fp16"], updates["fp32"]):
        assert torch.isfinite(fp16).all() and torch.allclose(fp16, fp32, rtol=0.05, atol=1e-3)

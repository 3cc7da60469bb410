"""`optimizer.step()` alone under each kernel choice (fused, foreach, for-loop) of torch's SGD and
AdamW and timm's LAMB and LARS, on a ResNet's parameters with random gradients: why
train.engine.optim takes fused kernels where torch has them and leaves timm's at their default.

    python bench/optim_kernels.py [--arch resnet50] [--device cpu] [--threads 1] [--calls 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from timm.optim import Lamb, Lars  # noqa: E402

from train.bench.loader import machine_description  # noqa: E402
from train.engine.optim import param_groups  # noqa: E402

ROWS = (  # name, constructor, layer-wise (timm's), kernel options to time
    ("sgd", lambda g, **k: torch.optim.SGD(g, momentum=0.9, **k), False),
    ("adamw", torch.optim.AdamW, False),
    ("lamb", lambda g, **k: Lamb(g, max_grad_norm=None, **k), True),
    ("lars", lambda g, **k: Lars(g, momentum=0.9, **k), True),
)


def seconds_per_step(optimizer: torch.optim.Optimizer, calls: int, device: torch.device) -> float:
    """Best of 3 rounds of `calls` steps, after 2 untimed ones (state allocated)."""
    for _ in range(2):
        optimizer.step()
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    print(f"{args.arch} on {args.device}, {args.threads} thread(s); {machine_description()}")
    for name, make, layerwise in ROWS:
        choices = [{"foreach": True}, {"foreach": False}] + ([] if layerwise else [{"fused": True}])
        for options in choices:
            groups = param_groups(model, 5e-5, False, layerwise)
            try:
                optimizer = make(groups, lr=0.0, **options)
                ms = f"{1000 * seconds_per_step(optimizer, args.calls, device):7.1f} ms"
            except (RuntimeError, TypeError) as err:  # no such kernel on this device/version
                ms = f"n/a ({str(err).splitlines()[0][:60]})"
            print(f"{name:6} {str(options):18} {ms}", flush=True)


if __name__ == "__main__":
    main()

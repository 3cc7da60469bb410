"""`train export`: a state_dict that torchvision's constructor for the arch loads strictly."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from train.engine.model import create_model
from train.errors import TrainError, one_line
from train.run import checkpoint as ckpt

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
EMA_ONLY_KEYS = ("n_averaged",)  # AveragedModel's counter, not part of the model


def plain_state_dict(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Strip wrapper prefixes (any order, any depth) and AveragedModel's counter."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        if key in EMA_ONLY_KEYS:
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value.detach().cpu().contiguous()
    return out


def export(run_dir: Path, out_path: Path, *, ema: bool = False) -> dict[str, Any]:
    """Write the model (or its EMA) of a run's final (else last) checkpoint as a state_dict."""
    path = ckpt.find_for_export(Path(run_dir))
    state = ckpt.load(path)
    if ema and state.get("ema") is None:
        raise TrainError(f"{path}: no EMA weights (the run had no ema_decay)")
    weights = plain_state_dict(state["ema"] if ema else state["model"])
    arch, num_classes = state["arch"], state["num_classes"]
    model_kwargs = dict(state.get("recipe", {}).get("model_kwargs", {}))
    try:
        model = create_model(arch, num_classes, model_kwargs)
    except (ImportError, RuntimeError, ValueError, TypeError) as exc:
        raise TrainError(f"{path}: cannot build {arch}: {exc}") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise TrainError(
            f"{path}: weights do not load into {arch}'s constructor ({one_line(exc)})"
        ) from None
    out_path = Path(out_path)
    if out_path.is_dir():
        raise TrainError(f"--out {out_path} is a directory; name the .pt file to write")
    try:
        ckpt.save_atomic(weights, out_path)
    except (OSError, RuntimeError) as exc:  # a read-only mount, a full disk
        raise TrainError(f"cannot write {out_path} ({ckpt.write_reason(exc)})") from None
    return {
        "source": str(path),
        "out": str(out_path),
        "arch": arch,
        "num_classes": num_classes,
        "ema": ema,
        "epoch": state["epoch"],
        "model_kwargs": model_kwargs,
        "blurpool": bool(state.get("recipe", {}).get("blurpool", False)),
    }

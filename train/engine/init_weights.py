"""Weights from a file into a built model: a shardtrain checkpoint (its model, not the EMA), or
a torchvision / timm state_dict. Strict, except the classifier head when the class count
differs (re-made: the constructor's fresh init). Used by `"init"` / `--init` and `train eval`."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from train.errors import TrainError, one_line

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's
EMA_ONLY_KEYS = ("n_averaged",)  # AveragedModel's counter, not part of the model
NESTED_KEYS = ("state_dict", "model")  # where some trainers nest the weights (timm: state_dict)
KEYS_SHOWN = 3  # first missing / unexpected keys a refusal lists


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


def read_file(path: Path) -> dict[str, Any]:
    """torch.load onto the CPU, tensors and plain data only (no arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise TrainError(f"{path}: not a readable weights file ({one_line(exc, 200)})") from None
    if not isinstance(state, dict):
        raise TrainError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    return state


def is_checkpoint(state: Mapping[str, Any]) -> bool:
    """A shardtrain checkpoint (train.run.checkpoint), not a bare state_dict."""
    return "version" in state and "arch" in state and isinstance(state.get("model"), Mapping)


def weights_of(state: Mapping[str, Any], path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors to load: a checkpoint's model (or EMA), else the state_dict itself (or the
    one nested under "state_dict" / "model")."""
    if is_checkpoint(state):
        if ema and state.get("ema") is None:
            raise TrainError(f"{path}: no EMA weights (the run had no ema_decay)")
        return plain_state_dict(state["ema"] if ema else state["model"])
    if ema:
        raise TrainError(f"{path}: --ema needs a shardtrain checkpoint; this is a state_dict")
    for key in NESTED_KEYS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainError(f"{path}: not a state_dict (expected parameter names -> tensors)")
    return plain_state_dict(state)


def head_name(model: nn.Module) -> str:
    """The classifier's module name: timm's get_classifier(), else the last nn.Linear."""
    names = {id(m): name for name, m in model.named_modules()}
    if hasattr(model, "get_classifier") and id(model.get_classifier()) in names:
        return names[id(model.get_classifier())]
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise TrainError(f"{type(model).__name__} has no nn.Linear classifier head")
    return linear[-1]


def head_classes(weights: Mapping[str, torch.Tensor], model: nn.Module) -> int | None:
    """The class count the weights' head was made for (None: they have no such head)."""
    weight = weights.get(f"{head_name(model)}.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """Load strictly, except a head made for another class count: that one is left as the
    constructor made it, and said in the one note returned. A mismatch is one TrainError."""
    own = model.state_dict()
    notes, skip = [], set()
    head = head_name(model)
    had = head_classes(weights, model)
    wanted = head_classes(own, model)
    if had is not None and had != wanted:
        skip = {k for k in own if k.startswith(f"{head}.")}
        notes.append(f"init: {head} re-made for {wanted} classes (weights had {had})")
    missing = [k for k in own if k not in weights and k not in skip]
    unexpected = [k for k in weights if k not in own]
    wrong = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in weights and k not in skip and weights[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label} {', '.join(keys[:KEYS_SHOWN])}{' ...' if len(keys) > KEYS_SHOWN else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        ]
        raise TrainError(f"{what}: weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict({k: v for k, v in weights.items() if k not in skip}, strict=not skip)
    return notes


def init_from(model: nn.Module, path: Path, arch: str) -> list[str]:
    """`"init"`: the model starts from `path` (a checkpoint's model weights, or a state_dict)."""
    state = read_file(path)
    if is_checkpoint(state) and state["arch"] != arch:
        raise TrainError(f"init {path}: a checkpoint of {state['arch']}, this run trains {arch}")
    notes = load_weights(model, weights_of(state, Path(path)), f"init {path}")
    kind = f"{state['arch']} checkpoint, epoch {state['epoch']}" if is_checkpoint(state) else arch
    return [f"init: weights from {path} ({kind})", *notes]

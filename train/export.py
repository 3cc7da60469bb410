"""`train export`: a state_dict that torchvision's constructor for the arch loads strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train.engine.init_weights import plain_state_dict
from train.engine.model import create_model
from train.errors import TrainError, one_line
from train.run import checkpoint as ckpt

__all__ = ["export", "plain_state_dict"]


def export(
    run_dir: Path, out_path: Path, *, ema: bool = False, which: str | None = None
) -> dict[str, Any]:
    """Write the model (or its EMA) of a run's checkpoint as a state_dict: `which` (best,
    final or last), else final.pt, else last.pt."""
    path = ckpt.find_for_export(Path(run_dir), which)
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

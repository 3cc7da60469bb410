"""`train run --dry-run`: the resolved per-epoch table, from the same queries a run makes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from train.plan.config import OPTIMIZER_KEYS, TIMM_OPTIMIZERS, Recipe, RunConfig
from train.plan.evals import evaluates_after
from train.plan.phases import LoadedSchedule
from train.plan.rebuilds import loader_changes, loader_settings
from train.plan.schedule import Schedule


@dataclass(frozen=True)
class EpochRow:
    """One row of `epoch_rows()`: what epoch `epoch` trains on and how."""

    epoch: int
    phase_index: int
    train_dir_name: str
    prep_size: int
    crop_size: int
    min_scale: float
    batch_size: int
    accum_steps: int
    lr_start: float  # at the epoch's first step
    lr_end: float  # approached at its last step
    lr_shape: str
    val_dir_name: str
    val_crop_size: int
    val_resize_size: int  # center crop only (rect_val ignores it)
    rect_val: bool
    evaluates: bool  # an evaluation after this epoch (eval_every, eval_offset, the last)
    loaders: str  # LoaderChanges.describe() for this epoch


def epoch_rows(schedule: Schedule, eval_every: int = 1, eval_offset: int = 0) -> list[EpochRow]:
    """One row per epoch, for `train run --dry-run`."""
    rows = []
    for epoch in range(schedule.num_epochs):
        index = schedule.phase_index_at(epoch)
        phase, settings = schedule.phases[index], loader_settings(schedule, epoch)
        lr_start, lr_end = phase.epoch_lr_range(epoch)
        rows.append(
            EpochRow(
                epoch=epoch,
                phase_index=index,
                train_dir_name=settings.train_dir_name,
                prep_size=settings.prep_size,
                crop_size=settings.crop_size,
                min_scale=settings.min_scale,
                batch_size=settings.batch_size,
                accum_steps=phase.accum_steps,
                lr_start=lr_start,
                lr_end=lr_end,
                lr_shape=phase.lr_shape,
                val_dir_name=settings.val_dir_name,
                val_crop_size=settings.val_crop_size,
                val_resize_size=settings.val_resize_size,
                rect_val=settings.rect_val,
                evaluates=evaluates_after(epoch, schedule.num_epochs, eval_every, eval_offset),
                loaders=loader_changes(schedule, epoch).describe(),
            )
        )
    return rows


def _format_lr(start: float, end: float) -> str:
    return f"{start:.4g}" if start == end else f"{start:.4g} -> {end:.4g}"


def format_table(rows: Sequence[EpochRow]) -> str:
    """Render `epoch_rows()` as aligned text (batch is per GPU)."""
    header = (
        "epoch",
        "phase",
        "train_dir",
        "crop",
        "min_scale",
        "batch/gpu",
        "lr",
        "lr_shape",
        "val_dir",
        "val_crop",
        "val_resize",
        "rect_val",
        "eval",
        "loaders",
    )
    body = [
        (
            str(r.epoch),
            str(r.phase_index),
            r.train_dir_name,
            str(r.crop_size),
            f"{r.min_scale:g}",
            str(r.batch_size) + (f"x{r.accum_steps}" if r.accum_steps > 1 else ""),
            _format_lr(r.lr_start, r.lr_end),
            r.lr_shape,
            r.val_dir_name,
            str(r.val_crop_size),
            "-" if r.rect_val else str(r.val_resize_size),
            "yes" if r.rect_val else "no",
            "yes" if r.evaluates else "",
            r.loaders,
        )
        for r in rows
    ]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
    text_columns = {2, 6, 7, 8, 13}
    lines = []
    for row in [header, *body]:
        cells = [
            cell.ljust(w) if c in text_columns else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def optimizer_line(recipe: Recipe) -> str:
    """The optimizer with the hyperparameters it reads, grad_clip and the training loss."""
    hyper = [f"{key}={getattr(recipe, key)}" for key in OPTIMIZER_KEYS[recipe.optimizer]]
    decay = f"weight_decay={recipe.weight_decay:g}"
    if not recipe.bn_weight_decay:
        trust = " or trust ratio" if recipe.optimizer in TIMM_OPTIMIZERS else ""
        decay += f" (no decay{trust} on BN and biases)"
    clip = f"grad_clip={recipe.grad_clip:g} (global norm)" if recipe.grad_clip else "no grad_clip"
    loss = f"loss={recipe.loss}"
    if recipe.bce_target_threshold is not None:
        loss += f" (targets above {recipe.bce_target_threshold:g} -> 1)"
    return (
        f"optimizer: {recipe.optimizer} ({', '.join([*hyper, decay])}); {clip}; {loss}, "
        f"label_smoothing={recipe.label_smoothing:g}; validation loss: ce"
    )


def dry_run_text(
    config: RunConfig,
    loaded: LoadedSchedule,
    recipe: Recipe,
    classes: list[str] | None,
    world_lines: Sequence[str] = (),
) -> str:
    schedule = loaded.schedule
    lines = [
        f"{config.phases_path}: {schedule.num_epochs} epochs in {len(schedule.phases)} "
        f"phases ({loaded.source_format} format); batch is per GPU",
        f"recipe: {', '.join(f'{k}={v}' for k, v in recipe.to_dict().items())}",
        optimizer_line(recipe),
    ]
    lines += world_lines  # train.plan.world_size: the global batch on this world size
    if loaded.note:
        lines.append(f"note: {loaded.note}")
    if classes is not None:
        lines.append(f"shards: all present under {config.data_dir} ({len(classes)} classes)")
    if recipe.init:
        missing = "" if Path(recipe.init).is_file() else "; warning: no such file"
        lines.append(f"init: the model starts from {recipe.init} (not on a resume){missing}")
    if config.stop_at:
        reach = " and ".join(f"{metric} >= {percent:g}%" for metric, percent in config.stop_at)
        lines.append(f"stop: at the first evaluation with {reach} (final.pt, report)")
    rows = epoch_rows(schedule, recipe.eval_every, recipe.eval_offset)
    lines += ["", format_table(rows)]
    return "\n".join(lines)

"""`train report`: time-to-accuracy table (DAWNBench style) and a PNG of the curves; no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from train.errors import TrainError
from train.run.metrics import CONFIG_NAME, METRICS_NAME, read_metrics

PLOT_NAME = "curves.png"
DEFAULT_TARGETS = {"top1": 75.9, "top5": 93.0}  # MLPerf's ResNet-50 top-1; DAWNBench's top-5


@dataclass(frozen=True)
class TargetTime:
    metric: str  # "top1" or "top5"
    target: float  # percent
    epoch: int | None  # first epoch at or above target; None: not reached
    hours: float | None
    train_hours: float | None  # without evaluation time
    value: float | None


def time_to_targets(
    records: Iterable[Mapping[str, Any]], targets: Mapping[str, float]
) -> list[TargetTime]:
    evaluated = [r for r in records if r.get("top1") is not None]
    out = []
    for metric, target in sorted(targets.items()):
        hit = next((r for r in evaluated if r[metric] >= target), None)
        out.append(
            TargetTime(
                metric,
                target,
                hit["epoch"] if hit else None,
                hit["hours"] if hit else None,
                hit.get("train_hours") if hit else None,
                hit[metric] if hit else None,
            )
        )
    return out


def format_targets(times: Sequence[TargetTime]) -> str:
    lines = []
    for t in times:
        name = f"{t.metric} >= {t.target:g}%"
        if t.epoch is None:
            lines.append(f"{name}: not reached")
        else:
            without = f", {t.train_hours:.4f} h without eval" if t.train_hours is not None else ""
            lines.append(
                f"{name}: epoch {t.epoch} ({t.value:.2f}%) at {t.hours:.4f} h"
                f"{without} ({60 * t.hours:.1f} min)"
            )
    return "\n".join(lines)


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """imagenet18's epoch/hours/top1/top5, plus hours without eval, loss, img/s, data wait."""
    header = (
        "epoch",
        "hours",
        "hours_no_eval",
        "top1",
        "top5",
        "train_loss",
        "lr",
        "img/s",
        "data_wait",
    )
    rows = [header]
    for r in records:
        top1, top5 = r.get("top1"), r.get("top5")
        rows.append(
            (
                str(r["epoch"]),
                f"{r['hours']:.5f}",
                f"{r.get('train_hours', r['hours']):.5f}",
                "-" if top1 is None else f"{top1:.3f}",
                "-" if top5 is None else f"{top5:.3f}",
                f"{r.get('train_loss', float('nan')):.4f}",
                f"{r.get('lr', float('nan')):.4g}",
                f"{r.get('img_per_s', 0):,.0f}",
                f"{100 * r.get('data_wait', 0):.1f}%",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def load_run(run_dir: Path) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_NAME).is_file():
        raise TrainError(
            f"{run_dir}: no {METRICS_NAME} (not a run directory, or no epoch finished yet)"
        )
    records = read_metrics(run_dir)
    if not records:
        raise TrainError(f"{run_dir}/{METRICS_NAME}: no complete epoch records")
    return records


def run_targets(run_dir: Path) -> dict[str, float]:
    """The targets a run was started with, resolved as `train run` did: its --target over the
    recipe's "targets" over DEFAULT_TARGETS (config.json holds both)."""
    import json

    try:
        config = json.loads((Path(run_dir) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(DEFAULT_TARGETS)
    try:
        targets = dict(config["recipe"]["targets"]) or dict(DEFAULT_TARGETS)
    except (KeyError, TypeError):
        targets = dict(DEFAULT_TARGETS)
    try:
        targets.update({name: float(value) for name, value in config["args"]["targets"]})
    except (KeyError, TypeError, ValueError):
        pass
    return targets


def plot(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, targets: Mapping[str, float]
) -> Path | None:
    """top-1/top-5 against hours and train loss against epoch; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, records in runs.items():
        evaluated = [r for r in records if r.get("top1") is not None]
        hours = [r["hours"] for r in evaluated]
        acc_ax.plot(hours, [r["top1"] for r in evaluated], marker=".", label=f"{name} top-1")
        acc_ax.plot(
            hours, [r["top5"] for r in evaluated], marker=".", linestyle="--", label=f"{name} top-5"
        )
        loss_ax.plot(
            [r["epoch"] for r in records],
            [r.get("train_loss") for r in records],
            marker=".",
            label=name,
        )
    for metric, target in targets.items():
        acc_ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        acc_ax.annotate(f"{metric} {target:g}%", (0, target), fontsize=8, color="grey")
    acc_ax.set(
        xlabel="hours (including evaluation)", ylabel="accuracy (%)", title="time to accuracy"
    )
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(
    run_dirs: Sequence[Path],
    targets: Mapping[str, float] | None = None,
    plot_path: Path | None = None,
) -> str:
    """The text `train report` prints; writes the PNG beside the first run (or plot_path).

    `targets` (e.g. {"top5": 93}) default to those of the first run.
    """
    if not run_dirs:
        raise TrainError("give at least one run directory")
    targets = dict(targets) if targets else run_targets(Path(run_dirs[0]))
    runs = {str(Path(d)): load_run(Path(d)) for d in run_dirs}
    parts = []
    for name, records in runs.items():
        parts += [
            f"== {name}",
            format_table(records),
            format_targets(time_to_targets(records, targets)),
            "",
        ]
    path = plot_path if plot_path is not None else Path(run_dirs[0]) / PLOT_NAME
    written = plot(runs, path, targets)
    parts.append(
        f"plot: {written}"
        if written is not None
        else f"plot: not written ({path} needs matplotlib: pip install matplotlib)"
    )
    return "\n".join(parts)

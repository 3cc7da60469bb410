"""bench/gpu.py's arithmetic and text, pure: timing windows, ratios, the table, the projection.

Nothing here touches a GPU, a loader or the clock, so tests check it on hand-made rows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

IMAGENET_TRAIN_IMAGES = 1_281_167  # one epoch of ImageNet-1k train, on one GPU
CONFIG_TITLES = {
    "a": "(a) synthetic on GPU",
    "b": "(b) ours, CPU decode",
    "c": "(c) ours, GPU decode",
    "d": "(d) ImageFolder+PIL",
}
# ResNet-50 batch per GPU by crop side (bench defaults: what fits comfortably in bf16 and
# matches imagenet18's per-GPU batches within 2x); other sides take the next larger entry's.
DEFAULT_BATCH = ((160, 256), (224, 192), (288, 128))


def default_batch_size(crop_size: int) -> int:
    for limit, batch_size in DEFAULT_BATCH:
        if crop_size <= limit:
            return batch_size
    return DEFAULT_BATCH[-1][1]


def prep_size_for(crop_size: int, prep_sizes: Sequence[int]) -> int:
    """The shards a crop reads: the smallest prep_size >= 1.25 x crop (imagenet18: 128 px from
    sz/160, 224 and 288 px from sz/320), else the largest."""
    fitting = [size for size in sorted(prep_sizes) if size >= 1.25 * crop_size]
    return fitting[0] if fitting else max(prep_sizes)


@dataclass(frozen=True)
class Mark:
    """One of train run's sync points: when it returned, steps done, and that interval's sums."""

    time: float
    steps: int
    images: float
    data_wait_s: float


def window_rate(marks: Sequence[Mark], warmup_steps: int) -> dict[str, float]:
    """img/s and data-wait share between the first mark at >= warmup_steps and the last mark.

    Marks are taken after train run's own host sync, so the GPU has finished every step up to
    each one: their differences are end-to-end wall time, Python overhead and stalls included.
    """
    start = next((i for i, mark in enumerate(marks) if mark.steps >= warmup_steps), None)
    if start is None or start == len(marks) - 1:
        raise ValueError(
            f"no timed interval after {warmup_steps} warm-up steps ({len(marks)} sync points)"
        )
    timed = marks[start + 1 :]
    seconds = marks[-1].time - marks[start].time
    images = sum(mark.images for mark in timed)
    return {
        "img_per_s": images / seconds,
        "data_wait": sum(m.data_wait_s for m in timed) / seconds,
        "seconds": seconds,
        "images": images,
        "steps_measured": marks[-1].steps - marks[start].steps,
    }


def _key(row: dict, config: str) -> tuple:
    return (config, row["arch"], row["crop_size"], "bf16", False)


def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio_vs_a: img/s over (a) bf16 eager of the same arch and crop; ratio_vs_d: over (d)."""
    measured = {
        (r["config"], r["arch"], r["crop_size"], r["precision"], r["compile"]): r
        for r in rows
        if r.get("img_per_s")
    }
    for row in rows:
        for name, base_config in (("ratio_vs_a", "a"), ("ratio_vs_d", "d")):
            base = measured.get(_key(row, base_config))
            row[name] = (
                row["img_per_s"] / base["img_per_s"]
                if row.get("img_per_s") and base is not None
                else None
            )
    return rows


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def format_table(rows: Sequence[dict]) -> str:
    header = (
        "config",
        "arch",
        "px",
        "batch",
        "precision",
        "compile",
        "img/s",
        "data-wait",
        "GPU mem GiB",
        "vs (a)",
        "vs (d)",
        "note",
    )
    body = [header]
    for r in rows:
        body.append(
            (
                CONFIG_TITLES[r["config"]],
                r["arch"],
                str(r["crop_size"]),
                str(r["batch_size"]),
                r["precision"],
                "on" if r["compile"] else "off",
                _fmt(r.get("img_per_s"), ",.0f"),
                _fmt(r.get("data_wait"), ".1f", 100)
                + ("%" if r.get("data_wait") is not None else ""),
                _fmt(r.get("gpu_mem_gib"), ".1f"),
                _fmt(r.get("ratio_vs_a"), ".2f"),
                _fmt(r.get("ratio_vs_d"), ".2f"),
                r.get("note", ""),
            )
        )
    widths = [max(len(row[c]) for row in body) for c in range(len(header) - 1)]
    lines = [
        "  ".join(
            [
                cell.rjust(w) if c > 1 else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row[:-1], widths))
            ]
            + [row[-1]]
        ).rstrip()
        for row in body
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- projection


def rate_at(rates: dict[int, float], crop_size: int) -> tuple[float, str]:
    """img/s at `crop_size` from measured {crop: img/s}: the measurement itself, else linear in
    seconds per image against crop area between the measured sides around it (a conv net's
    work grows with the area), else the nearest measured side's rate."""
    if crop_size in rates:
        return rates[crop_size], "measured"
    sides = sorted(rates)
    at = bisect.bisect(sides, crop_size)
    if at == 0 or at == len(sides):
        nearest = sides[0] if at == 0 else sides[-1]
        return rates[nearest], f"nearest ({nearest} px)"
    low, high = sides[at - 1], sides[at]
    t = (crop_size**2 - low**2) / (high**2 - low**2)
    seconds = (1 - t) / rates[low] + t / rates[high]
    return 1 / seconds, f"interpolated ({low}-{high} px)"


def project(
    schedule_path: Path,
    rows: Sequence[dict],
    configs: Sequence[str] = ("a", "b", "c", "d"),
    images_per_epoch: int = IMAGENET_TRAIN_IMAGES,
    root: Path | None = None,
) -> dict:
    """Hours of the schedule's training steps on one GPU, per config, from bf16 eager rows of
    the schedule's arch (or, if none was measured, of the first measured arch, flagged).
    A relative `schedule_path` is read under `root` (default: the working directory)."""
    from train.plan.phases import load_schedule

    loaded = load_schedule(schedule_path if root is None else Path(root) / schedule_path)
    arch = loaded.recipe.get("arch", "resnet50")
    usable = [
        r for r in rows if r.get("img_per_s") and r["precision"] == "bf16" and not r["compile"]
    ]
    rates_arch = (
        arch if any(r["arch"] == arch for r in usable) else (usable[0]["arch"] if usable else None)
    )
    out = {
        "schedule": str(schedule_path),
        "arch": arch,
        "rates_arch": rates_arch,
        "num_epochs": loaded.schedule.num_epochs,
        "images_per_epoch": images_per_epoch,
        "phases": [],
        "hours": {},
    }
    for config in configs:
        rates = {
            r["crop_size"]: r["img_per_s"]
            for r in usable
            if r["config"] == config and r["arch"] == rates_arch
        }
        if rates:
            out["hours"][config] = 0.0
        for index, phase in enumerate(loaded.schedule.phases):
            crops = [phase.crop_size_at(epoch) for epoch in range(*phase.epochs)]  # a ramp moves
            if len(out["phases"]) <= index:
                shown = phase.crop_size if len(set(crops)) == 1 else f"{crops[0]}-{crops[-1]}"
                out["phases"].append(
                    {
                        "epochs": list(phase.epochs),
                        "crop_size": shown,
                        "num_epochs": len(crops),
                        "rates": {},
                    }
                )
            if not rates:
                continue
            how = rate_at(rates, crops[0])[1]
            hours = sum(images_per_epoch / rate_at(rates, crop)[0] / 3600 for crop in crops)
            rate = len(crops) * images_per_epoch / hours / 3600
            out["phases"][index]["rates"][config] = {"img_per_s": rate, "how": how, "hours": hours}
            out["hours"][config] += hours
    return out


def format_projection(projections: Sequence[dict]) -> str:
    lines = [
        f"projection (arithmetic on the rates above, NOT a measurement): one GPU, "
        f"{IMAGENET_TRAIN_IMAGES:,} images per epoch, training steps only (no validation, "
        "start-up or loader rebuilds); each phase at the bf16 eager img/s of its crop side, "
        "at this run's batch sizes (the schedules' per-GPU batches differ)"
    ]
    for p in projections:
        flag = (
            ""
            if p["rates_arch"] == p["arch"]
            else f"  [no {p['arch']} rows: {p['rates_arch']} rates used, "
            f"not a {p['arch']} projection]"
        )
        lines.append(f"  {p['schedule']}: {p['arch']}, {p['num_epochs']} epochs{flag}")
        for phase in p["phases"]:
            cells = [
                f"{c} {v['img_per_s']:,.0f} img/s {v['hours']:.2f} h ({v['how']})"
                for c, v in phase["rates"].items()
            ]
            lines.append(
                f"    epochs {phase['epochs'][0]:>2}-{phase['epochs'][1]:<2} "
                f"{phase['crop_size']:>3} px: " + ("; ".join(cells) or "no rates")
            )
        totals = "; ".join(f"{CONFIG_TITLES[c]} {h:.2f} h" for c, h in p["hours"].items())
        lines.append(f"    total: {totals or 'no rates measured'}")
    return "\n".join(lines)

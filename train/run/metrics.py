"""What a run writes: config.json, metrics.jsonl, event.log, TensorBoard events (rank 0 only)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from formats import write_atomic
from train.errors import TrainError

METRICS_NAME = "metrics.jsonl"
EVENT_LOG_NAME = "event.log"
CONFIG_NAME = "config.json"
TENSORBOARD_DIR = "tb"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run, in file order; a torn last line (a kill) is skipped."""
    path = Path(run_dir) / METRICS_NAME
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def config_record(
    config: Any,
    loaded: Any,
    recipe: Any,
    env: Any,
    num_classes: int,
    precision: str,
    resumed: dict[str, Any] | None,
) -> dict[str, Any]:
    """config.json: the resolved inputs (RunConfig, LoadedSchedule, Recipe) and the
    environment (DistEnv, versions, git sha), next to the results."""
    return {
        "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
        },
        "command": sys.argv,
        "schedule_source": str(config.phases_path),
        "schedule_format": loaded.source_format,
        "note": loaded.note,
        "schedule": loaded.schedule.to_dicts(),
        "recipe": recipe.to_dict(),
        "num_classes": num_classes,
        "world_size": env.world_size,
        "backend": env.backend,
        "device": str(env.device),
        "precision": precision,
        "global_batch_sizes": [
            p.batch_size * p.accum_steps * env.world_size for p in loaded.schedule.phases
        ],
        "git_sha": git_sha(Path(__file__).resolve().parent),
        "environment": environment_info(),
        "resumed_from": resumed,
    }


def git_sha(repo_dir: Path) -> str | None:
    """HEAD of the checkout holding the code, with '-dirty' when it has local changes."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict[str, Any]:
    """Library versions and the device, as they were when the run started."""
    import numpy
    import PIL
    import torch
    import torchvision

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info.update(
            cudnn=torch.backends.cudnn.version(),
            gpu=torch.cuda.get_device_name(),
            gpu_count=torch.cuda.device_count(),
        )
        if hasattr(torch.cuda, "nccl"):
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def tensorboard_writer() -> type:
    """torch's SummaryWriter, or one line saying how to get it (train.run.main asks first)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # a dependency: its absence is a broken install
        raise TrainError(
            f"TensorBoard events need the tensorboard package ({exc}); "
            "pip install tensorboard, or pass --no-tensorboard"
        ) from None
    return SummaryWriter


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write (a full disk, a read-only --out) is one line naming the file."""
    try:
        yield
    except OSError as exc:
        raise TrainError(f"cannot write {path} ({exc.strerror or exc})") from None


class RunLog:
    """Append-only run outputs; `enabled=False` (ranks > 0) turns every method into a no-op.
    Every failed write raises TrainError (`writing`)."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool = True,
        resume_epoch: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        writer = tensorboard_writer() if tensorboard else None  # before anything is written
        with writing(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.out_dir / METRICS_NAME
        if resume_epoch is not None and metrics.exists():
            # Epochs at or after the resume point are trained again: drop their old records.
            kept = [r for r in read_metrics(self.out_dir) if r.get("epoch", 0) < resume_epoch]
            with writing(metrics):
                _write_lines(metrics, [json.dumps(r) for r in kept])
        event_log = self.out_dir / EVENT_LOG_NAME
        if not event_log.exists():
            with writing(event_log):
                event_log.write_text("~~epoch\thours\ttop1\ttop5\n\n", encoding="utf-8")
        if writer is not None:
            with writing(self.out_dir / TENSORBOARD_DIR):
                self._tb = writer(str(self.out_dir / TENSORBOARD_DIR))

    def write_config(self, config: dict[str, Any], *, resumed: bool) -> None:
        """config.json for a fresh run; a resume adds config.resume-<n>.json beside it, and a
        resume that --allow-changed let through is also listed in config.json's
        "changed_on_resume", so the original record says the run did not stay as it began."""
        if not self.enabled:
            return
        path = self.out_dir / CONFIG_NAME
        original = path if resumed and path.exists() else None
        if original is not None:
            n = 1
            while (path := self.out_dir / f"config.resume-{n}.json").exists():
                n += 1
        with writing(path):
            path.write_text(json.dumps(config, indent=1, default=str) + "\n", encoding="utf-8")
        changes = (config.get("resumed_from") or {}).get("allowed_changes")
        if original is not None and changes:
            self._note_changes(
                original,
                {
                    **{k: config["resumed_from"][k] for k in ("epoch", "step")},
                    "changes": changes,
                    "config": path.name,
                },
            )

    def _note_changes(self, path: Path, entry: dict[str, Any]) -> None:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        record.setdefault("changed_on_resume", []).append(entry)
        with writing(path):
            _write_lines(path, [json.dumps(record, indent=1, default=str)])

    def event(self, text: str) -> None:
        """A free-text line (or lines) in event.log, as imagenet18 logged dataset/LR changes."""
        if self.enabled:
            path = self.out_dir / EVENT_LOG_NAME
            with writing(path), open(path, "a", encoding="utf-8") as f:
                f.write(text.rstrip("\n") + "\n")

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self.out_dir / METRICS_NAME
        with writing(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if record.get("top1") is not None:
            self.event(
                f"~~{record['epoch']}\t{record['hours']:.5f}\t\t{record['top1']:.3f}"
                f"\t\t{record['top5']:.3f}\n"
            )
        if self._tb is not None:
            step = record["epoch"] + 1
            for key in ("top1", "top5", "train_loss", "img_per_s", "data_wait", "hours"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"epoch/{key}", record[key], step)
            self._tb.flush()

    def scalars(self, global_step: int, values: dict[str, float]) -> None:
        """Per-log-interval training curves (TensorBoard only; the bar shows them live)."""
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"train/{key}", value, global_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _write_lines(path: Path, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def now() -> float:
    """Wall clock for run timing (monotonic: a clock change mid-run cannot bend the curve)."""
    return time.monotonic()


def epoch_record(
    state: Any,
    elapsed_s: float,
    top: dict,
    lr: float,
    phase_index: int,
    phase: Any,
    world_size: int,
) -> dict[str, Any]:
    """One metrics.jsonl line: accuracy, time (with and without eval), loss, speed, shape."""
    sums, hours = state.sums, elapsed_s / 3600
    batch, accum = phase.batch_size, phase.accum_steps
    return {
        "epoch": state.epoch,
        **top,
        "hours": hours,
        "train_hours": hours - state.eval_s / 3600,
        "train_loss": sums.loss_sum / max(sums.batches, 1),
        "lr": lr,
        "img_per_s": sums.images / sums.train_s if sums.train_s > 0 else 0.0,
        "data_wait": sums.data_wait_s / max(sums.train_s, 1e-9),
        "phase": phase_index,
        "crop_size": phase.crop_size_at(state.epoch),
        "batch_size": batch,
        "accum_steps": accum,
        "global_batch_size": batch * accum * world_size,
        "world_size": world_size,
    }

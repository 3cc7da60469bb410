"""What a run is asked to do: `RunConfig` (the command line) and `Recipe` (a phases file's
"recipe" object), each checked here, at the boundary, plus the errors a run reports.

Imports nothing of train/ (every other module may import this one). The per-phase keys live in
train.plan.schedule; this module holds the run-wide ones. Checks a later stage can only make with
the data at hand (shards, labels, a checkpoint to resume) live next to that data: train.run.shards
for the shard directories, train.run.checkpoint for resume.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from train.data.constants import AUTO_AUGMENT_POLICIES

TIMM_PREFIX = "timm/"  # "arch": "timm/resnet50d" builds timm's model (an optional extra)


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message is one line for `train: error: ...`."""


class Interrupted(TrainError):
    """SIGINT/SIGTERM: a checkpoint was saved; `--resume auto` continues from it."""


class RecipeError(ValueError):
    """A recipe key the trainer cannot use; the message is one line naming the key."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunConfig:
    """`train run`'s arguments. None means: take it from the recipe (or its default)."""

    phases_path: Path
    data_dir: Path | None = None
    out_dir: Path | None = None  # None: runs/<phases file stem>
    arch: str | None = None
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    channels_last: bool = True
    seed: int = 0
    resume: str | None = None  # None | "auto" | checkpoint path or run directory
    overwrite: bool = False  # clear the run directory's outputs and start fresh
    allow_changed: bool = False  # resume although the recipe/seed/precision/schedule changed
    workers: int = 4
    decode: str = "cpu"  # cpu | gpu (nvJPEG, train.data.gpu_decode)
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    checkpoint_every_steps: int = 0  # 0: at epoch ends (and on signals) only
    log_every: int = 20  # optimizer steps between progress updates (each one a host sync)
    label_smoothing: float | None = None
    mixup_alpha: float | None = None
    cutmix_alpha: float | None = None
    ema_decay: float | None = None
    flip_tta: bool | None = None
    sync_bn: bool = False
    threads: int | None = None  # torch CPU threads (None: torch's default)
    deterministic: bool | None = None  # None: on for CPU, off for CUDA (cudnn.benchmark)
    full_prep_size: int | None = None  # imagenet18 lists: shards standing in for full size
    targets: tuple[tuple[str, float], ...] = ()  # overrides recipe / DEFAULT_TARGETS
    tensorboard: bool = True
    progress: bool = True
    dry_run: bool = False

    @property
    def run_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / self.phases_path.stem


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_SEED = 2**32 - 1  # train.data.samplers keeps 32 bits of the seed: larger ones would repeat others
WORKERS_PER_CORE = 4  # --workers / --threads beyond this many per core only thrash (capped)


def check_config(config: RunConfig) -> None:
    """The plain-value arguments, checked before anything is loaded or started."""
    for name, low in (("workers", 0), ("eval_every", 1), ("checkpoint_every_steps", 0),
                      ("log_every", 1), ("seed", 0)):
        if getattr(config, name) < low:
            raise TrainError(f"--{name.replace('_', '-')} must be >= {low}, got "
                             f"{getattr(config, name)}")
    if config.seed > MAX_SEED:
        raise TrainError(f"--seed must be <= {MAX_SEED} (32 bits), got {config.seed}")
    for name in ("threads", "full_prep_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name, allowed in (("decode", ("cpu", "gpu")), ("device", ("auto", "cuda", "cpu")),
                          ("precision", PRECISIONS)):
        if getattr(config, name) not in allowed:
            raise TrainError(f"--{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                             f"got {getattr(config, name)!r}")
    for metric, percent in config.targets:
        if not (math.isfinite(percent) and 0 < percent <= 100):
            raise TrainError(f"--target {metric}={percent:g}: must be a percentage in (0, 100]")
    if config.overwrite and config.resume == "auto":
        raise TrainError("--overwrite and --resume auto contradict each other: --overwrite "
                         "clears the run that --resume auto would continue; pass one")


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_cap(num_cpus: int, procs_per_node: int = 1) -> int:
    """WORKERS_PER_CORE per core, shared by this node's processes: 1,000 loader workers would
    only exhaust memory."""
    return max(1, WORKERS_PER_CORE * num_cpus // max(procs_per_node, 1))


def cap_workers(config: RunConfig, num_cpus: int,
                procs_per_node: int = 1) -> tuple[RunConfig, list[str]]:
    """--workers and --threads capped at worker_cap(), with one warning each."""
    cap = worker_cap(num_cpus, procs_per_node)
    changes, warnings = {}, []
    for name in ("workers", "threads"):
        value = getattr(config, name)
        if value is not None and value > cap:
            changes[name] = cap
            warnings.append(f"train: warning: --{name} {value} is more than {WORKERS_PER_CORE} "
                            f"per core ({num_cpus} cores, {procs_per_node} process(es) per "
                            f"node): using {cap}")
    return dataclasses.replace(config, **changes), warnings


@dataclass(frozen=True)
class Recipe:
    """Trainer settings from phases.json's "recipe", with command-line overrides applied."""

    arch: str = "resnet50"  # torchvision name, or "timm/<name>" with timm installed
    tuned_num_gpus: int | None = None  # world size the LRs were tuned for (None: unknown)
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-5
    bn_weight_decay: bool = False  # False: no decay on BatchNorm weights/biases nor any bias
    label_smoothing: float = 0.0
    zero_init_residual: bool = True  # last BN gamma of each residual block starts at 0
    blurpool: bool = False  # FFCV's anti-aliased downsampling (train.engine.layers.add_blurpool)
    drop_path: float = 0.0  # stochastic depth: the deepest block's drop rate (linear in depth)
    auto_augment: str | None = None  # "ra" | "ta_wide" | "imagenet" (torchvision v2 policies)
    val_flip_tta: bool = False  # average logits with the flipped image at the final eval
    mixup_alpha: float = 0.0  # 0 = off (torchvision transforms.v2.MixUp on the device batch)
    cutmix_alpha: float = 0.0  # 0 = off; with both on, each batch picks one at random
    ema_decay: float = 0.0  # 0 = off; else an EMA of the weights is kept and evaluated too
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra constructor args
    targets: Mapping[str, float] = field(default_factory=dict)  # {"top1": 75.9, "top5": 93}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> Recipe:
        """Check types and ranges; `overrides` whose value is None are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"recipe key {unknown[0]!r}: unknown; allowed: "
                              f"{', '.join(sorted(known))}")
        values = dict(data)
        values.update({k: v for k, v in overrides.items() if v is not None})
        recipe = cls(**values)
        recipe.check()
        return recipe

    @property
    def is_timm(self) -> bool:
        return self.arch.startswith(TIMM_PREFIX)

    def check(self) -> None:
        def fail(key: str, message: str) -> None:
            raise RecipeError(f"recipe key {key!r}: {message}, got {getattr(self, key)!r}")

        def finite(v: Any) -> bool:
            return is_number(v) and math.isfinite(v)

        if not isinstance(self.arch, str):
            fail("arch", "must be a model name")
        check_arch(self.arch)
        if self.tuned_num_gpus is not None and (not is_int(self.tuned_num_gpus)
                                                or self.tuned_num_gpus < 1):
            fail("tuned_num_gpus", "must be a positive integer")
        if self.optimizer != "sgd":
            fail("optimizer", "only 'sgd' is implemented")
        for key in ("nesterov", "bn_weight_decay", "zero_init_residual", "blurpool",
                    "val_flip_tta"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "must be true or false")
        for key, upper in (("momentum", 1.0), ("weight_decay", math.inf),
                           ("label_smoothing", 1.0), ("mixup_alpha", math.inf),
                           ("cutmix_alpha", math.inf), ("ema_decay", 1.0), ("drop_path", 1.0)):
            value = getattr(self, key)
            if not finite(value) or not 0 <= value < upper:
                fail(key, f"must be a number in [0, {upper:g})")
        if self.nesterov and self.momentum == 0:  # torch.optim.SGD refuses it, much later
            fail("nesterov", "needs a momentum above 0 (momentum is 0)")
        if self.auto_augment is not None and self.auto_augment not in AUTO_AUGMENT_POLICIES:
            fail("auto_augment", f"must be one of {', '.join(AUTO_AUGMENT_POLICIES)} or null")
        if self.drop_path and not self.is_timm and not is_torchvision_resnet(self.arch):
            fail("drop_path", "needs a torchvision ResNet (or a timm/ model)")
        if not isinstance(self.model_kwargs, Mapping):
            fail("model_kwargs", "must be an object")
        if not isinstance(self.targets, Mapping) or not all(
                k in ("top1", "top5") and finite(v) and 0 < v <= 100
                for k, v in self.targets.items()):
            fail("targets", 'must be an object of percentages like {"top1": 75.9, "top5": 93.0}')

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_kwargs"] = dict(self.model_kwargs)
        out["targets"] = dict(self.targets)
        return out


def torchvision_archs() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def is_torchvision_resnet(arch: str) -> bool:
    """torchvision's ResNet family (BasicBlock / Bottleneck): resnet*, resnext*, wide_resnet*."""
    return arch.startswith(("resnet", "resnext", "wide_resnet")) and arch in torchvision_archs()


def check_arch(arch: str) -> None:
    """A torchvision classification model, or `timm/<name>` when timm is installed."""
    if arch.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            raise RecipeError(f"recipe key 'arch': {arch!r} needs timm (pip install "
                              "'shardtrain[timm]' or pip install timm)") from None
        name = arch[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            raise RecipeError(f"recipe key 'arch': timm has no model {name!r} "
                              "(timm.list_models() lists them)")
        return
    if arch not in torchvision_archs():
        raise RecipeError(f"recipe key 'arch': must name a torchvision classification model "
                          f"(resnet18, resnet50, ...) or timm/<name>, got {arch!r}")

"""What a run is asked: `RunConfig` (`train run`'s options) and `Recipe` (phases.json's "recipe"),
each setting declared once (train.plan.settings) and checked here, at the boundary."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from train.data.augment import auto_augment_problem
from train.data.constants import AUTO_AUGMENT_POLICIES, DECODERS, INSTALL_TIMM
from train.errors import RecipeError, TrainError
from train.plan.settings import is_number, problems, setting

TIMM_PREFIX = "timm/"  # "arch": "timm/resnet50d" builds timm's model (an optional extra)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cuda", "cpu")
OPTIMIZER_KEYS = {  # the recipe keys each optimizer reads (given for another one: refused)
    "sgd": ("momentum", "nesterov"),
    "adamw": ("betas", "eps"),
    "lamb": ("betas", "eps"),
    "lars": ("momentum", "nesterov", "eps", "trust_coefficient"),
}
OPTIMIZERS = tuple(OPTIMIZER_KEYS)
TIMM_OPTIMIZERS = ("lamb", "lars")  # timm.optim's (the timm extra)
LOSSES = ("ce", "bce")
GLOBAL_BATCH_MODES = ("keep", "scale")
MAX_SEED = 2**32 - 1  # train.data.samplers keeps 32 bits of the seed
WORKERS_PER_CORE = 4  # --workers / --threads beyond this many per core only thrash (capped)
TARGET_METRICS = ("top1", "top5")


@dataclass(frozen=True)
class Recipe:
    """Trainer settings from phases.json's "recipe"; those with cli=True are also options."""

    arch: str = setting("resnet50", "torchvision model or timm/<name>", cli=True)
    tuned_num_gpus: int | None = setting(None, "world size the LRs were tuned for", low=1)
    optimizer: str = setting("sgd", "optimizer", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "SGD and LARS momentum", low=0, high=1, bounds="[)")
    nesterov: bool = setting(False, "Nesterov momentum (SGD, LARS)")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW and LAMB betas [beta1, beta2]")
    eps: float = setting(1e-8, "AdamW, LAMB and LARS epsilon", low=0, bounds="(]")
    trust_coefficient: float = setting(0.001, "LARS trust coefficient (eta)", low=0, bounds="(]")
    grad_clip: float = setting(
        0.0, "clip the global gradient norm to this (0 = off)", low=0, bounds="[)"
    )
    loss: str = setting("ce", "ce: softmax cross-entropy; bce: per-class sigmoid", choices=LOSSES)
    bce_target_threshold: float | None = setting(
        None, "bce: soft targets above it become 1 (timm's bce_target_thresh)", low=0, high=1
    )
    weight_decay: float = setting(5e-5, "L2 weight decay", low=0, bounds="[)")
    bn_weight_decay: bool = setting(False, "decay BatchNorm weights and all biases too")
    label_smoothing: float = setting(0.0, "label smoothing", low=0, high=1, bounds="[)", cli=True)
    zero_init_residual: bool = setting(True, "last BN gamma of each residual block starts at 0")
    blurpool: bool = setting(False, "anti-aliased downsampling (train.engine.layers)")
    drop_path: float = setting(
        0.0, "stochastic depth of the deepest block", low=0, high=1, bounds="[)"
    )
    auto_augment: str | None = setting(
        None, f"torchvision v2 policy ({' | '.join(AUTO_AUGMENT_POLICIES)}) or timm:<config>"
    )
    color_jitter: float = setting(
        0.0, "ColorJitter brightness, contrast and saturation strength (0 = off)", low=0
    )
    random_erasing: float = setting(
        0.0, "random erasing probability per image (0 = off)", low=0, high=1
    )
    repeat_aug: int = setting(1, "repeated augmentation: each image N times per epoch", low=1)
    val_flip_tta: bool = setting(False, "flip-average the final eval", cli=True)
    mixup_alpha: float = setting(0.0, "mixup alpha (0 = off)", low=0, bounds="[)", cli=True)
    cutmix_alpha: float = setting(0.0, "cutmix alpha (0 = off)", low=0, bounds="[)", cli=True)
    ema_decay: float = setting(
        0.0, "EMA decay of the weights (0 = off)", low=0, high=1, bounds="[)", cli=True
    )
    model_kwargs: Mapping[str, Any] = setting({}, "extra model constructor arguments")
    init: str | None = setting(
        None,
        "start from these weights (a run's checkpoint, torchvision or timm state_dict)",
        cli=True,
    )
    eval_every: int = setting(1, "evaluate every N epochs (the last always)", low=1, cli=True)
    eval_offset: int = setting(
        0, "evaluate after epochs eval_offset + k * eval_every (MLPerf's eval_offset)", low=0
    )
    targets: Mapping[str, float] = setting({}, 'e.g. {"top1": 75.9, "top5": 93}')

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> Recipe:
        """Check types and ranges; `overrides` whose value is None are ignored."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecipeError(
                f"recipe key {unknown[0]!r}: unknown; allowed: {', '.join(sorted(known))}"
            )
        values = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        if isinstance(values.get("betas"), list):  # JSON has no tuples
            values["betas"] = tuple(values["betas"])
        recipe = cls(**values)
        recipe.check()
        recipe.check_optimizer_keys(values)
        return recipe

    @property
    def is_timm(self) -> bool:
        return self.arch.startswith(TIMM_PREFIX)

    def check(self) -> None:
        def fail(key: str, message: str) -> None:
            raise RecipeError(f"recipe key {key!r}: {message}, got {getattr(self, key)!r}")

        for key, message in problems(self):
            fail(key, message)
        check_arch(self.arch)
        if self.nesterov and self.momentum == 0:  # torch.optim.SGD refuses it, much later
            fail("nesterov", "needs a momentum above 0 (momentum is 0)")
        if self.optimizer in TIMM_OPTIMIZERS and importlib.util.find_spec("timm") is None:
            raise RecipeError(
                f"recipe key 'optimizer': {self.optimizer!r} is timm's and needs it "
                f"({INSTALL_TIMM})"
            )
        if self.auto_augment is not None and (why := auto_augment_problem(self.auto_augment)):
            fail("auto_augment", why)
        if self.bce_target_threshold is not None and self.loss != "bce":
            fail("bce_target_threshold", f"only applies to loss 'bce' (loss is {self.loss!r})")
        betas = self.betas
        if not (
            isinstance(betas, tuple)
            and len(betas) == 2
            and all(is_number(b) and 0 <= b < 1 for b in betas)
        ):
            fail("betas", "must be two numbers in [0, 1), like [0.9, 0.999]")
        if self.drop_path and not self.is_timm and not is_torchvision_resnet(self.arch):
            fail("drop_path", "needs a torchvision ResNet (or a timm/ model)")
        if not all(k in TARGET_METRICS and is_percent(v) for k, v in self.targets.items()):
            fail("targets", 'must be an object of percentages like {"top1": 75.9, "top5": 93.0}')

    def check_optimizer_keys(self, given: Mapping[str, Any]) -> None:
        """A key `given` (defaults do not count) that the optimizer does not read, set to other
        than its default, is likely a recipe written for another optimizer: refused, not
        ignored. At its default it changes nothing (a full to_dict() dump passes)."""
        used = OPTIMIZER_KEYS[self.optimizer]
        defaults = Recipe()
        for key in sorted(set(given) & {k for keys in OPTIMIZER_KEYS.values() for k in keys}):
            if key not in used and getattr(self, key) != getattr(defaults, key):
                raise RecipeError(
                    f"recipe key {key!r}: optimizer {self.optimizer!r} does not use it "
                    f"(it reads {', '.join(used)})"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "betas": list(self.betas),
            "model_kwargs": dict(self.model_kwargs),
            "targets": dict(self.targets),
        }


RECIPE_OPTIONS = tuple(f.name for f in dataclasses.fields(Recipe) if f.metadata.get("cli"))


def is_percent(value: Any) -> bool:
    return is_number(value) and math.isfinite(value) and 0 < value <= 100


@dataclass(frozen=True)
class RunConfig:
    """`train run`'s options; `recipe` holds the Recipe options given (None: the recipe's)."""

    phases_path: Path = setting(help="phases.json (ours or imagenet18's format)", flag="phases")
    data_dir: Path | None = setting(None, "directory holding train-<N>/ and val-<N>/", flag="data")
    out_dir: Path | None = setting(None, "run directory [default: runs/<phases stem>]", flag="out")
    device: str = setting("auto", "where to train", choices=DEVICES)
    precision: str = setting("auto", "auto: bf16 on CUDA, fp32 on CPU", choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile, each phase's shape warmed first")
    channels_last: bool = setting(True, "channels_last memory format")
    seed: int = setting(0, "same seed, same data order and init", low=0, high=MAX_SEED)
    resume: str | None = setting(None, "'auto' (continue OUT's run if any) or a checkpoint")
    overwrite: bool = setting(False, "clear OUT's old run outputs and start fresh")
    allow_changed: bool = setting(
        False,
        "resume although recipe, schedule, seed or precision changed (recorded in config.json)",
    )
    workers: int = setting(
        4, f"loader workers per GPU (capped at {WORKERS_PER_CORE} per core)", low=0
    )
    decode: str = setting("cpu", "JPEG decode", choices=DECODERS)
    checkpoint_every_steps: int = setting(
        0, "also checkpoint every N steps (0: epochs only)", low=0
    )
    log_every: int = setting(20, "steps between progress updates (each a host sync)", low=1)
    sync_bn: bool = setting(False, "SyncBatchNorm across GPUs (CUDA)")
    threads: int | None = setting(None, "torch CPU threads", low=1)
    deterministic: bool | None = setting(None, "deterministic kernels [default: on for CPU]")
    full_prep_size: int | None = setting(
        None, "imagenet18 lists: prep_size standing in for full-size images", low=1
    )
    tensorboard: bool = setting(True, "TensorBoard events in OUT/tb")
    progress: bool = setting(True, "progress bar")
    dry_run: bool = setting(False, "print the per-epoch table and check shards; train nothing")
    global_batch: str | None = setting(
        None,
        "on a GPU count other than the recipe's tuned_num_gpus: keep its global batch, or keep "
        "the per-GPU batch and scale the LR linearly [default: warn only]",
        choices=GLOBAL_BATCH_MODES,
    )
    targets: tuple[tuple[str, float], ...] = ()  # --target top1=75.9 (repeatable)
    stop_at: tuple[tuple[str, float], ...] = ()  # --stop-at top1=75.9: end once all reached
    recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # RECIPE_OPTIONS given

    @property
    def run_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / self.phases_path.stem


def option_name(field_name: str, flag: str | None = None) -> str:
    return "--" + (flag or field_name).replace("_", "-")


def check_config(config: RunConfig) -> None:
    """The plain-value options, checked before anything is loaded or started."""
    flags = {f.name: f.metadata.get("flag") for f in dataclasses.fields(RunConfig)}
    for name, message in problems(config):
        raise TrainError(
            f"{option_name(name, flags[name])} {message}, got {getattr(config, name)!r}"
        )
    for flag, pairs in (("--target", config.targets), ("--stop-at", config.stop_at)):
        for metric, percent in pairs:
            if metric not in TARGET_METRICS or not is_percent(percent):
                raise TrainError(f"{flag} {metric}={percent:g}: must be a percentage in (0, 100]")
    if config.overwrite and config.resume == "auto":
        raise TrainError(
            "--overwrite and --resume auto contradict each other: --overwrite "
            "clears the run that --resume auto would continue; pass one"
        )


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_cap(num_cpus: int, procs_per_node: int = 1) -> int:
    """WORKERS_PER_CORE per core, shared by this node's processes."""
    return max(1, WORKERS_PER_CORE * num_cpus // max(procs_per_node, 1))


def cap_workers(
    config: RunConfig, num_cpus: int, procs_per_node: int = 1
) -> tuple[RunConfig, list[str]]:
    """--workers and --threads capped at worker_cap(), with one warning each."""
    cap = worker_cap(num_cpus, procs_per_node)
    changes, warnings = {}, []
    for name in ("workers", "threads"):
        value = getattr(config, name)
        if value is not None and value > cap:
            changes[name] = cap
            warnings.append(
                f"train: warning: --{name} {value} is more than {WORKERS_PER_CORE} "
                f"per core ({num_cpus} cores, {procs_per_node} process(es) per "
                f"node): using {cap}"
            )
    return dataclasses.replace(config, **changes), warnings


@functools.lru_cache(maxsize=1)
def torchvision_archs() -> frozenset[str]:
    """torchvision's classification models (list_models' answer), read from its source with ast:
    importing torchvision costs seconds, and the dry run needs no torch (tests compare both)."""
    spec = importlib.util.find_spec("torchvision")
    names = set()
    for path in (Path(spec.origin).parent / "models").glob("*.py") if spec else ():
        for node in ast.parse(path.read_text()).body:
            for deco in getattr(node, "decorator_list", []):
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "register_model":
                    named = [k.value.value for k in deco.keywords if k.arg == "name"]
                    names.add(named[0] if named else node.name)
    return frozenset(names)


def is_torchvision_resnet(arch: str) -> bool:
    """torchvision's ResNet family (BasicBlock / Bottleneck): resnet*, resnext*, wide_resnet*."""
    return arch.startswith(("resnet", "resnext", "wide_resnet")) and arch in torchvision_archs()


def check_arch(arch: str) -> None:
    """A torchvision classification model, or `timm/<name>` when timm is installed."""
    if arch.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            raise RecipeError(f"recipe key 'arch': {arch!r} needs timm ({INSTALL_TIMM})") from None
        if not timm.is_model(arch[len(TIMM_PREFIX) :]):
            raise RecipeError(
                f"recipe key 'arch': timm has no model {arch[len(TIMM_PREFIX) :]!r} "
                "(timm.list_models() lists them)"
            )
        return
    if arch not in torchvision_archs():
        raise RecipeError(
            f"recipe key 'arch': must name a torchvision classification model "
            f"(resnet18, resnet50, ...) or timm/<name>, got {arch!r}"
        )

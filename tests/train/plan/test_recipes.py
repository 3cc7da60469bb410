"""Every shipped recipe dry-runs, and runs as published: its first 20 steps on CPU at tiny size
(crop 32 px, batch 2, stand-in data) through train run's own objects, with every recipe key
honoured (checked on what the run built: optimizer, loss, mixup, EMA, model, the loaders'
settings) and no note or warning that a key is ignored, unimplemented or without effect."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.train.standin import NUM_CLASSES, StandInData
from train.engine.dist import init_distributed
from train.engine.layers import LAST_BN, count_blurpool
from train.plan.config import Recipe, RunConfig
from train.plan.phases import load_schedule
from train.run.epochs import EpochLoop
from train.run.main import load_inputs, run
from train.run.signals import StopFlag

REPO = Path(__file__).resolve().parents[3]
RECIPES = sorted((REPO / "phases").glob("*.json"))
STEPS, BATCH, CROP, PREP = 20, 2, 32, 160
IGNORED = ("ignor", "not implement", "no effect", "unknown", "warning")
AUGMENT_KEYS = ("auto_augment", "color_jitter", "random_erasing", "repeat_aug")


def tiny_copy(path: Path, out: Path) -> Path:
    """The recipe as published, its phases shrunk: same keys, tiny crops and batches (a
    validation resize keeps its ratio to the crop)."""
    loaded = load_schedule(path)
    phases = []
    for phase in loaded.schedule.to_dicts():
        ramp = isinstance(phase["crop_size"], list)
        resize, published_crop = phase.get("val_resize_size"), phase["val_crop_size"]
        phase.update(
            prep_size=PREP,
            val_prep_size=PREP,
            batch_size=BATCH,
            val_crop_size=CROP,
            crop_size=[CROP, CROP + 16] if ramp else CROP,
        )
        if resize is not None:
            phase["val_resize_size"] = round(CROP * resize / published_crop)
        phases.append(phase)
    out.write_text(
        json.dumps({"recipe": dict(loaded.recipe), "note": loaded.note, "phases": phases})
    )
    return out


class RecordingData(StandInData):
    """The stand-in data, keeping what the run asked of its loaders."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.augments: list[Any] = []
        self.val_resize_sizes: list[int | None] = []

    def train_loader(self, *args, augment=None, **kwargs):
        self.augments.append(augment)
        return super().train_loader(*args, augment=augment, **kwargs)

    def val_loader(self, *args, resize_size=None, **kwargs):
        self.val_resize_sizes.append(resize_size)
        return super().val_loader(*args, **kwargs)  # the stand-in resizes whole images


@dataclasses.dataclass
class Ran:
    """What a recipe's first steps built and did."""

    recipe: Recipe
    training: EpochLoop
    data: RecordingData
    record: dict[str, Any]
    last_bn_zero: bool  # every ResNet block's last BN gamma was 0 before the first step

    @property
    def trainer(self):
        return self.training.trainer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer


def optimizer_class(name: str) -> type:
    if name in ("lamb", "lars"):
        from timm.optim import Lamb, Lars

        return {"lamb": Lamb, "lars": Lars}[name]
    return {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]


def hyper(ran: Ran, key: str, option: str, optimizers: tuple[str, ...]) -> Any:
    """The optimizer's value of a key that only some optimizers have, when it differs."""
    if ran.recipe.optimizer not in optimizers:
        return None
    value = ran.optimizer.defaults.get(option)
    if isinstance(value, list):  # betas
        value = tuple(value)
    return None if value == getattr(ran.recipe, key) else value


def decay_problem(ran: Ran) -> Any:
    """Conv/linear weights decay by weight_decay; 1-d parameters too only with bn_weight_decay."""
    wd, rest = ran.recipe.weight_decay, ran.recipe.weight_decay * ran.recipe.bn_weight_decay
    for group in ran.optimizer.param_groups:
        for p in group["params"]:
            if group["weight_decay"] != (wd if p.ndim > 1 else rest):
                return f"a {p.ndim}-d parameter decays by {group['weight_decay']}"
    return None


def mix_alphas(mix) -> dict[str, float]:
    """{"mixup_alpha": a, "cutmix_alpha": b} of the step's transforms.v2 MixUp/CutMix."""
    parts = [] if mix is None else list(getattr(mix, "transforms", [mix]))
    return {f"{type(t).__name__.lower()}_alpha": t.alpha for t in parts}


def ema_decay_of(ema) -> float:
    """The decay the EMA's averaging function applies: one update of 0 toward 1."""
    if ema is None:
        return 0.0
    average, current = [torch.zeros(1)], [torch.ones(1)]
    ema.multi_avg_fn(average, current, torch.tensor(1))
    return 1.0 - float(average[0])


def loader_setting(augment, key: str, default: Any) -> Any:
    """A train loader's augmentation setting, as the loader was given it."""
    if augment is None:
        return default
    if key == "auto_augment" and not hasattr(augment, key):
        return getattr(augment, "name", default)  # train.data.auto_augment.AutoAugment
    return getattr(augment, key, default)


def drops_paths(module: torch.nn.Module) -> bool:
    """Does a training-mode forward differ between two seeds (stochastic depth)?"""
    model = copy.deepcopy(module).train()
    x = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outputs.append(model(x))
    return not torch.equal(*outputs)


def evaluates_first_epoch(recipe: Recipe, num_epochs: int) -> bool:
    """MLPerf's rule: after epochs eval_offset + k * eval_every, and after the last."""
    done = 1
    return done == num_epochs or (
        done >= recipe.eval_offset and (done - recipe.eval_offset) % recipe.eval_every == 0
    )


# key -> what differs from the recipe (None: honoured)
CHECKS: dict[str, Callable[[Ran], Any]] = {
    "arch": lambda r: (
        None
        if [k for k in r.trainer.module.state_dict()]
        == list(torch_model(r.recipe.arch).state_dict())
        else "the model is not torchvision's"
    ),
    "optimizer": lambda r: (
        None
        if type(r.optimizer) is optimizer_class(r.recipe.optimizer)
        else type(r.optimizer).__name__
    ),
    "momentum": lambda r: hyper(r, "momentum", "momentum", ("sgd", "lars")),
    "nesterov": lambda r: hyper(r, "nesterov", "nesterov", ("sgd", "lars")),
    "betas": lambda r: hyper(r, "betas", "betas", ("adamw", "lamb")),
    "eps": lambda r: hyper(r, "eps", "eps", ("adamw", "lamb", "lars")),
    "trust_coefficient": lambda r: hyper(r, "trust_coefficient", "trust_coeff", ("lars",)),
    "weight_decay": decay_problem,
    "bn_weight_decay": decay_problem,
    # 0 / "ce" / None: what a trainer without these keys does
    "grad_clip": lambda r: (
        None
        if getattr(r.trainer, "grad_clip", 0.0) == r.recipe.grad_clip
        else getattr(r.trainer, "grad_clip", "no grad_clip")
    ),
    "loss": lambda r: (
        None
        if getattr(r.trainer, "loss", "ce") == r.recipe.loss
        else getattr(r.trainer, "loss", "no loss")
    ),
    "bce_target_threshold": lambda r: (
        None
        if getattr(r.trainer, "bce_target_threshold", None) == r.recipe.bce_target_threshold
        else "not the step's"
    ),
    "label_smoothing": lambda r: (
        None if r.trainer.label_smoothing == r.recipe.label_smoothing else r.trainer.label_smoothing
    ),
    "zero_init_residual": lambda r: (
        None
        if r.last_bn_zero == r.recipe.zero_init_residual
        else f"last BN gammas zero: {r.last_bn_zero}"
    ),
    "blurpool": lambda r: (
        None
        if (count_blurpool(r.trainer.module) > 0) == r.recipe.blurpool
        else "BlurPool layers do not match"
    ),
    "drop_path": lambda r: (
        None
        if drops_paths(r.trainer.module) == (r.recipe.drop_path > 0)
        else "stochastic depth does not match"
    ),
    **{
        key: (
            lambda r, key=key, default=default: (
                None
                if {loader_setting(a, key, default) for a in r.data.augments}
                == {getattr(r.recipe, key)}
                else [loader_setting(a, key, default) for a in r.data.augments]
            )
        )
        for key, default in zip(AUGMENT_KEYS, (None, 0.0, 0.0, 1))
    },
    **{
        key: (
            lambda r, key=key: (
                None
                if mix_alphas(r.trainer.mix).get(key, 0.0) == getattr(r.recipe, key)
                else mix_alphas(r.trainer.mix)
            )
        )
        for key in ("mixup_alpha", "cutmix_alpha")
    },
    "ema_decay": lambda r: (
        None
        if ema_decay_of(r.trainer.ema) == pytest.approx(r.recipe.ema_decay, abs=1e-7)
        and (r.trainer.ema is None or int(r.trainer.ema.n_averaged) == STEPS)
        else f"decay {ema_decay_of(r.trainer.ema)}, not updated at every step"
    ),
    "eval_every": lambda r: (
        None
        if (r.record["top1"] is not None)
        == evaluates_first_epoch(r.recipe, r.training.schedule.num_epochs)
        else f"evaluated after epoch 0: {r.record['top1'] is not None}"
    ),
    "eval_offset": lambda r: CHECKS["eval_every"](r),
}
ELSEWHERE = {  # keys whose effect this CPU run cannot show; where it is tested instead
    "tuned_num_gpus": "the world size note and --global-batch (tests/train/run)",
    "val_flip_tta": "the final evaluation only (tests/train/run/test_run.py)",
    "model_kwargs": "the timm model test (test_recipe_fidelity.py)",
    "init": "train run --init (tests/train)",
    "targets": "the time-to-target report (tests/train/run)",
}


def torch_model(arch: str) -> torch.nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, num_classes=NUM_CLASSES)


def run_first_steps(path: Path, tmp_path: Path) -> Ran:
    config = RunConfig(
        tiny_copy(path, tmp_path / path.name),
        out_dir=tmp_path / "run",
        device="cpu",
        progress=False,
        tensorboard=False,
        log_every=5,
        threads=1,
    )
    loaded, recipe = load_inputs(config)
    accum = loaded.schedule.phases[0].accum_steps
    data = RecordingData(num_train=STEPS * BATCH * accum, num_val=6)
    training = EpochLoop(config, loaded, recipe, data, init_distributed("cpu"), 3, StopFlag())
    blocks = [m for m in training.trainer.module.modules() if type(m) in LAST_BN]
    last_bn_zero = bool(blocks) and all(
        not getattr(b, LAST_BN[type(b)]).weight.any() for b in blocks
    )
    try:
        record = training.train_epoch()
    finally:
        training.loaders.close()
        training.log.close()
    return Ran(recipe, training, data, record, last_bn_zero)


def test_every_recipe_key_has_a_check() -> None:
    keys = {f.name for f in dataclasses.fields(Recipe)}
    assert set(CHECKS) | set(ELSEWHERE) == keys and not set(CHECKS) & set(ELSEWHERE)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_dry_runs_without_ignored_keys(path: Path, tmp_path: Path, capsys) -> None:
    run(RunConfig(path, out_dir=tmp_path / "run", dry_run=True, progress=False))
    out, err = capsys.readouterr()
    assert "builds and takes every crop" in out
    said = (out + err).lower()
    assert not [word for word in IGNORED if word in said], said


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_its_first_steps_with_every_key_honoured(
    path: Path, tmp_path: Path, capsys
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ran = run_first_steps(path, tmp_path)
    assert ran.training.state.step == STEPS and ran.record["train_loss"] > 0
    said = capsys.readouterr().err.lower()
    assert not [word for word in IGNORED if word in said], said
    warned = [str(w.message) for w in caught]
    assert not [w for w in warned if any(word in w.lower() for word in IGNORED[:3])], warned
    problems = {key: check(ran) for key, check in CHECKS.items()}
    assert {k: v for k, v in problems.items() if v is not None} == {}
    # the phase keys: LR per step, RandomResizedCrop's scale, the validation resize
    phase, steps = ran.training.schedule.phases[0], STEPS
    assert ran.optimizer.param_groups[0]["lr"] == pytest.approx(phase.lr_at(0, steps - 1, steps))
    assert {c[4] for c in ran.data.calls if c[0] == "train_loader"} == {phase.min_scale}
    if phase.val_resize_size is not None:  # else the loader's default (crop / 0.875)
        assert set(ran.data.val_resize_sizes) == {phase.val_resize_size}


def test_torchvision_archs_read_from_source_equal_list_models() -> None:
    import torchvision

    from train.plan.config import torchvision_archs

    assert torchvision_archs() == set(torchvision.models.list_models(module=torchvision.models))

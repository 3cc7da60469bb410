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
from typing import Any

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


NOT_READ = object()  # a key the recipe's optimizer has no use for


def optimizer_name(optimizer: torch.optim.Optimizer) -> str | None:
    from timm.optim import Lamb, Lars

    kinds = {torch.optim.SGD: "sgd", torch.optim.AdamW: "adamw", Lamb: "lamb", Lars: "lars"}
    return kinds.get(type(optimizer))


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


def observed(ran: Ran) -> dict[str, Any]:
    """Each recipe key as the run built it, in the recipe's terms. grad_clip, loss and
    bce_target_threshold default to what a trainer without those keys does (0, ce, None)."""
    recipe, trainer, optimizer = ran.recipe, ran.trainer, ran.optimizer

    def option(name: str, *optimizers: str) -> Any:
        if recipe.optimizer not in optimizers:
            return NOT_READ
        value = optimizer.defaults.get(name)
        return tuple(value) if isinstance(value, (list, tuple)) else value

    decays = {(p.ndim > 1, g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    mixes = mix_alphas(trainer.mix)
    same_net = list(trainer.module.state_dict()) == list(torch_model(recipe.arch).state_dict())
    evaluated = ran.record["top1"] is not None
    evaluates = evaluates_first_epoch(recipe, ran.training.schedule.num_epochs)
    return {
        "arch": recipe.arch if same_net else type(trainer.module).__name__,
        "optimizer": optimizer_name(optimizer),
        "momentum": option("momentum", "sgd", "lars"),
        "nesterov": option("nesterov", "sgd", "lars"),
        "betas": option("betas", "adamw", "lamb"),
        "eps": option("eps", "adamw", "lamb", "lars"),
        "trust_coefficient": option("trust_coeff", "lars"),
        "weight_decay": {wd for multi, wd in decays if multi},
        "bn_weight_decay": any(wd for multi, wd in decays if not multi),
        "grad_clip": getattr(trainer, "grad_clip", 0.0),
        "loss": getattr(trainer, "loss", "ce"),
        "bce_target_threshold": getattr(trainer, "bce_target_threshold", None),
        "label_smoothing": trainer.label_smoothing,
        "zero_init_residual": ran.last_bn_zero,
        "blurpool": count_blurpool(trainer.module) > 0,
        "drop_path": recipe.drop_path if drops_paths(trainer.module) else 0.0,
        **{
            key: {loader_setting(a, key, default) for a in ran.data.augments}
            for key, default in zip(AUGMENT_KEYS, (None, 0.0, 0.0, 1))
        },
        "mixup_alpha": mixes.get("mixup_alpha", 0.0),
        "cutmix_alpha": mixes.get("cutmix_alpha", 0.0),
        # updated at every optimizer step, with the recipe's decay
        "ema_decay": ema_decay_of(trainer.ema)
        if trainer.ema is None or int(trainer.ema.n_averaged) == STEPS
        else f"{int(trainer.ema.n_averaged)} updates in {STEPS} steps",
        "eval_every": recipe.eval_every if evaluated == evaluates else f"evaluated: {evaluated}",
        "eval_offset": recipe.eval_offset if evaluated == evaluates else f"evaluated: {evaluated}",
    }


def wanted(recipe: Recipe) -> dict[str, Any]:
    """The same keys as the recipe sets them."""
    values = {key: getattr(recipe, key) for key in CHECKED}
    values.update(
        weight_decay={recipe.weight_decay},
        ema_decay=pytest.approx(recipe.ema_decay, abs=1e-7),  # float32 arithmetic
        **{key: {getattr(recipe, key)} for key in AUGMENT_KEYS},
    )
    return values


CHECKED = (  # on the objects a run builds (observed)
    "arch optimizer momentum nesterov betas eps trust_coefficient weight_decay bn_weight_decay "
    "grad_clip loss bce_target_threshold label_smoothing zero_init_residual blurpool drop_path "
    "auto_augment color_jitter random_erasing repeat_aug mixup_alpha cutmix_alpha ema_decay "
    "eval_every eval_offset"
).split()
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
    assert set(CHECKED) | set(ELSEWHERE) == keys and not set(CHECKED) & set(ELSEWHERE)


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
    got, want = observed(ran), wanted(ran.recipe)
    assert list(got) == CHECKED
    differ = {k: (got[k], want[k]) for k in CHECKED if got[k] is not NOT_READ and got[k] != want[k]}
    assert differ == {}, "recipe key: (what the run built, what the recipe says)"
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

"""The epochs of a run: build the trainer, resume, then per epoch loaders, steps, evaluation,
metrics and a checkpoint."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.engine.dist import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    broadcast_buffers,
    rank_zero_agreed,
)
from train.engine.launch import is_main_process, say
from train.engine.loop import EvalSums, SyncPoint, TrainState, evaluate, train_steps
from train.engine.model import build_model, build_optimizer, model_notes
from train.engine.step import ModelStep, make_mix, make_scaler, resolve_precision
from train.errors import Interrupted, TrainError
from train.plan.config import Recipe, RunConfig
from train.plan.phases import LoadedSchedule
from train.plan.rebuilds import loader_settings
from train.run import checkpoint as ckpt
from train.run.metrics import RunLog, config_record, now, read_metrics
from train.run.report import format_targets, time_to_targets
from train.run.run_dir import clear_outputs
from train.run.shards import DataSource, LiveLoaders
from train.run.signals import StopFlag


def configure_torch(config: RunConfig, device: torch.device) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    deterministic = (
        config.deterministic if config.deterministic is not None else device.type == "cpu"
    )
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left
        torch.backends.cudnn.allow_tf32 = True


def build_trainer(
    config: RunConfig, recipe: Recipe, env: DistEnv, num_classes: int, precision: str
) -> ModelStep:
    """Model (same initial weights on every rank), EMA, optimizer, scaler, DDP, compile."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)  # nothing draws from it; seeded, its saved state is the same too
    module = build_model(recipe, num_classes)
    for note in model_notes(recipe, module):
        say(note)
    if config.sync_bn:
        if env.device.type != "cuda":
            raise TrainError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only)")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    module = module.to(env.device, memory_format=memory_format)
    ema = None
    if recipe.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(
            module, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay)
        )
    optimizer = build_optimizer(module, recipe, env.device)
    model, ddp = module, None
    if env.distributed:
        # Buffers (BN statistics) stay per rank while training; rank 0's are broadcast
        # before each evaluation and are what checkpoints hold.
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True
        )
    if config.compile:
        # Static shapes: one graph per (batch, crop), all warmed before timing, rather than
        # a slower dynamic-shape graph after the second shape.
        model = torch.compile(model, dynamic=False)
    return ModelStep(
        model,
        optimizer,
        env.device,
        precision,
        recipe.label_smoothing,
        make_scaler(env.device, precision),
        make_mix(recipe.mixup_alpha, recipe.cutmix_alpha, num_classes),
        ema,
        module,
        ddp,
    )


def check_ranks_agree(env: DistEnv, resuming: bool, state: TrainState) -> None:
    """Every rank resumes from the same position, or none does (one min and one max)."""
    if not env.distributed:
        return
    position = [float(resuming), float(state.epoch), float(state.step)]
    high = all_reduce_max(env, torch.tensor(position, device=env.device))
    low = -all_reduce_max(env, -torch.tensor(position, device=env.device))
    if not torch.equal(high, low):
        mine = f"epoch {state.epoch} step {state.step}" if resuming else "a fresh start"
        raise TrainError(
            f"ranks disagree on the resume point (rank {env.rank} sees {mine}); "
            "put --out on storage that every node shares"
        )


class EpochLoop:
    """A run in progress: the epoch loop around train_steps, evaluation and checkpoints."""

    def __init__(
        self,
        config: RunConfig,
        loaded: LoadedSchedule,
        recipe: Recipe,
        data: DataSource,
        env: DistEnv,
        num_classes: int,
        stop: StopFlag,
    ) -> None:
        """Call with the run directory locked (train.run.run_dir.hold_run_dir): this decides
        between a fresh start (old outputs cleared), a resume and a refusal."""
        self.config, self.recipe, self.env, self.stop, self.data = config, recipe, env, stop, data
        self.schedule, self.out_dir = loaded.schedule, config.run_dir
        self.precision = resolve_precision(config.precision, env.device)
        configure_torch(config, env.device)
        resume_from = ckpt.resume_path(self.out_dir, config.resume, config.overwrite)
        if config.overwrite or resume_from is None:  # nothing there that resume_path keeps
            cleared = rank_zero_agreed(env, lambda: clear_outputs(self.out_dir))
            if cleared:
                say(
                    f"{self.out_dir}: removed the old run's {', '.join(cleared)} "
                    f"({'--overwrite' if config.overwrite else 'nothing trained to resume'})"
                )
        self.trainer = build_trainer(config, recipe, env, num_classes, self.precision)
        self.identity = {
            "arch": recipe.arch,
            "num_classes": num_classes,
            "recipe": recipe.to_dict(),
            "schedule": self.schedule.to_dicts(),
            "seed": config.seed,
            "world_size": env.world_size,
            "precision": self.precision,
            "sync_bn": config.sync_bn,
        }
        self.state = TrainState()
        resumed = self.resume(resume_from) if resume_from is not None else None
        check_ranks_agree(env, resumed is not None, self.state)
        augment = None
        if recipe.auto_augment:
            from train.data.auto_augment import AutoAugment

            augment = AutoAugment(recipe.auto_augment)
        self.loaders = LiveLoaders(data, env, config, self.schedule, augment)
        record = config_record(config, loaded, recipe, env, num_classes, self.precision, resumed)
        self.log = rank_zero_agreed(env, lambda: self.open_log(record, resumed)) or RunLog(
            self.out_dir, enabled=False
        )
        tuned = recipe.tuned_num_gpus
        if tuned is not None and tuned != env.world_size:
            say(
                f"note: this schedule's LRs were tuned for {tuned} GPU(s); this run has "
                f"{env.world_size}, so its global batch is {env.world_size}/{tuned} of the "
                "tuned one at the same LR (batch_size is per GPU)"
            )
        self.clock: float | None = None  # when this process started timing

    def resume(self, path: Path) -> dict[str, Any]:
        """Load, check (train.run.checkpoint.check_resume) and restore `path`; what config.json
        records about it."""
        saved = ckpt.load(path)
        changes = ckpt.check_resume(saved, path, self.identity, self.config.allow_changed)
        try:
            ckpt.restore(saved, self.state, self.trainer)
        except TrainError as exc:
            raise TrainError(f"{path}: {exc}") from None
        return {
            "path": str(path),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "allowed_changes": changes,
        }

    def open_log(self, record: dict[str, Any], resumed: dict[str, Any] | None) -> RunLog:
        """Rank 0's run outputs: config.json (or config.resume-<n>.json), event.log, tb/."""
        log = RunLog(
            self.out_dir,
            enabled=True,
            tensorboard=self.config.tensorboard,
            resume_epoch=self.state.epoch if resumed else None,
        )
        log.write_config(record, resumed=bool(resumed))
        if resumed:
            log.event(
                f"Resumed from {resumed['path']} at epoch {self.state.epoch} step {self.state.step}"
            )
            if resumed["allowed_changes"]:
                log.event(f"--allow-changed: {'; '.join(resumed['allowed_changes'])}")
        return log

    def elapsed_now(self) -> float:
        """Seconds of training and evaluation so far, over all processes of this run."""
        return self.state.elapsed_s + (now() - self.clock if self.clock is not None else 0.0)

    def save(self, *, final: bool = False, record: dict[str, Any] | None = None) -> None:
        """All ranks call this (same point); rank 0 writes `record` (an epoch's metrics) and
        the checkpoint, then everyone learns how that went (train.engine.dist.rank_zero_agreed).

        Refuses weights that are no longer finite: a step can turn them to inf/NaN from a
        finite loss (checked only before the step), and saving them would overwrite the last
        good checkpoint. DDP keeps parameters identical on every rank, so every rank reaches
        the same decision without a collective; one host sync per save. A write that fails
        (a full disk, a read-only --out) stops every rank with one line, the last good
        checkpoint kept (train.run.checkpoint.save_atomic replaces it only when complete)."""
        parameters = [p.detach() for p in self.trainer.module.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()):
            raise TrainError(
                f"weights are no longer finite at epoch {self.state.epoch} step "
                f"{self.state.step}; stopping without saving: {self.kept()}"
            )
        rank_zero_agreed(self.env, lambda: self.write_outputs(final, record))

    def write_outputs(self, final: bool, record: dict[str, Any] | None) -> None:
        directory = ckpt.checkpoint_dir(self.out_dir)
        try:
            if record is not None:
                self.log.epoch(record)
            saved = ckpt.capture(self.state, self.trainer, self.identity, self.elapsed_now())
            ckpt.save_atomic(saved, directory / ckpt.LAST_NAME)
            if final:
                ckpt.save_atomic(saved, directory / ckpt.FINAL_NAME)
        except TrainError as exc:  # the metrics line (train.run.metrics says which file)
            raise TrainError(f"{exc}; {self.kept()}") from None
        except (OSError, RuntimeError) as exc:  # torch's zip writer wraps some OSErrors
            reason = (
                exc.strerror
                if isinstance(exc, OSError) and exc.strerror
                else " ".join(str(exc).split())[:200]
            )
            raise TrainError(
                f"cannot save a checkpoint in {directory} ({reason}); {self.kept()}"
            ) from None

    def kept(self) -> str:
        last = ckpt.checkpoint_dir(self.out_dir) / ckpt.LAST_NAME
        return (
            f"the last good checkpoint is {last}"
            if last.exists()
            else "no checkpoint was written yet"
        )

    def train(self, targets: dict[str, float]) -> dict[str, Any]:
        schedule, state = self.schedule, self.state
        if state.epoch >= schedule.num_epochs:
            say(f"{self.out_dir}: the run is already complete ({schedule.num_epochs} epochs)")
            return {}
        if self.config.compile:
            settings = [
                loader_settings(schedule, e) for e in range(state.epoch, schedule.num_epochs)
            ]
            self.trainer.warm_up(
                [(s.batch_size, s.crop_size) for s in settings], self.config.channels_last, say
            )
        self.clock = now()
        records: list[dict[str, Any]] = []
        try:
            while state.epoch < schedule.num_epochs:
                records.append(self.train_epoch())
                state.next_epoch()
                self.save(final=state.epoch == schedule.num_epochs, record=records[-1])
                flag = torch.tensor([float(self.stop.requested)], device=self.env.device)
                if state.epoch < schedule.num_epochs and all_reduce_max(self.env, flag).item():
                    raise Interrupted(
                        f"stopped after epoch {state.epoch - 1}; checkpoint "
                        f"saved; continue with --resume auto"
                    )
        finally:
            self.loaders.close()
            self.log.close()
        history = read_metrics(self.out_dir) if is_main_process() else records
        summary = format_targets(time_to_targets(history, targets))
        last = history[-1] if history else {}
        say(
            f"done: top-1 {last.get('top1', float('nan')):.2f}%  top-5 "
            f"{last.get('top5', float('nan')):.2f}%  in {last.get('hours', 0):.4f} h\n{summary}"
        )
        self.log.event(summary)
        return last

    def train_epoch(self) -> dict[str, Any]:
        from tqdm import tqdm

        state, config, epoch = self.state, self.config, self.state.epoch
        phase_index = self.schedule.phase_index_at(epoch)
        phase = self.schedule.phases[phase_index]
        loader, events = self.loaders.for_epoch(epoch)
        for text in events:
            self.log.event(text)
        steps = len(loader) // phase.accum_steps
        if steps == 0:
            raise TrainError(
                f"epoch {epoch}: the train loader has too few batches (batch_size "
                f"{phase.batch_size} x {self.env.world_size} ranks x accum_steps "
                f"{phase.accum_steps} > images?)"
            )
        bar = tqdm(
            total=steps,
            initial=state.step,
            disable=not (config.progress and is_main_process()),
            desc=f"epoch {epoch}/{self.schedule.num_epochs} {phase.crop_size_at(epoch)}px",
            leave=True,
            dynamic_ncols=True,
        )
        lr = phase.lr_at(epoch, min(state.step, steps - 1), steps)
        try:
            if state.step < steps:  # a stop at an epoch's last step resumes into its eval
                loader.set_epoch(epoch, state.step * phase.accum_steps)
                lr = train_steps(
                    self.trainer,
                    state,
                    self.data.prefetcher(loader, self.env.device, config.channels_last),
                    steps=steps,
                    lr_at=lambda step: phase.lr_at(epoch, step, steps),
                    on_sync=lambda sync: self.on_sync(sync, bar),
                    sync_every=config.log_every,
                    accum_steps=phase.accum_steps,
                    checkpoint_every=config.checkpoint_every_steps,
                    seed=config.seed,
                    env=self.env,
                    stop_requested=lambda: self.stop.requested,
                )
        finally:
            bar.close()
        return self.finish_epoch(phase_index, lr)

    def on_sync(self, sync: SyncPoint, bar) -> None:
        """Progress bar and curves; stop on a non-finite loss; checkpoint when due or asked."""
        if not math.isfinite(sync.loss_sum):
            raise TrainError(
                f"loss is {sync.loss_sum} at epoch {sync.epoch} step "
                f"{sync.step - 1} (lr {sync.lr:.4g}); stopping without saving: "
                f"{self.kept()}"
            )
        bar.set_postfix_str(
            f"{sync.img_per_s:,.0f} img/s loss {sync.loss:.3f} lr {sync.lr:.4g} "
            f"data-wait {100 * sync.data_wait:.0f}%",
            refresh=False,
        )
        bar.update(sync.step - bar.n)
        self.log.scalars(
            sync.global_step,
            {
                "loss": sync.loss,
                "lr": sync.lr,
                "img_per_s": sync.img_per_s,
                "data_wait": sync.data_wait,
            },
        )
        if sync.stop or sync.checkpoint_due:
            self.save()
        if sync.stop:
            raise Interrupted(
                f"stopped at epoch {sync.epoch} step {sync.step}; checkpoint "
                "saved; continue with --resume auto"
            )

    def finish_epoch(self, phase_index: int, lr: float) -> dict[str, Any]:
        epoch, state = self.state.epoch, self.state
        last_epoch = epoch == self.schedule.num_epochs - 1
        top: dict[str, Any] = {"top1": None, "top5": None, "val_images": None}
        if last_epoch or (epoch + 1) % self.config.eval_every == 0:
            started = now()
            flip = self.recipe.val_flip_tta and last_epoch
            top = self.evaluate(self.trainer.module, flip) | {"flip_tta": flip}
            if self.trainer.ema is not None:
                ema_top = self.evaluate(self.trainer.ema.module, flip)
                top.update(ema_top1=ema_top["top1"], ema_top5=ema_top["top5"])
            state.eval_s += now() - started
        phase = self.schedule.phases[phase_index]
        sums, hours = state.sums, self.elapsed_now() / 3600
        record = {
            "epoch": epoch,
            **top,
            "hours": hours,
            "train_hours": hours - state.eval_s / 3600,
            "train_loss": sums.loss_sum / max(sums.batches, 1),
            "lr": lr,
            "img_per_s": sums.images / sums.train_s if sums.train_s > 0 else 0.0,
            "data_wait": sums.data_wait_s / max(sums.train_s * self.env.world_size, 1e-9),
            "phase": phase_index,
            "crop_size": phase.crop_size_at(epoch),
            "batch_size": phase.batch_size,
            "accum_steps": phase.accum_steps,
            "global_batch_size": phase.batch_size * phase.accum_steps * self.env.world_size,
            "world_size": self.env.world_size,
        }
        if record["top1"] is not None:
            say(
                f"epoch {epoch}: top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  "
                f"loss {record['train_loss']:.3f}  {record['img_per_s']:,.0f} img/s  "
                f"data-wait {100 * record['data_wait']:.0f}%  {record['hours']:.4f} h"
            )
        return record

    def evaluate(self, module: nn.Module, flip: bool) -> dict[str, Any]:
        broadcast_buffers(self.env, module)
        batches = self.data.prefetcher(self.loaders.val, self.env.device, self.config.channels_last)
        sums = evaluate(module, batches, self.env.device, self.precision, flip)
        result = EvalSums.from_tensor(all_reduce_sum(self.env, sums))
        # val_images: how many images the metrics counted, summed over ranks; it must equal the
        # validation set's size (padded duplicates would inflate it).
        return {
            "top1": result.top1,
            "top5": result.top5,
            "val_loss": result.loss,
            "val_images": int(result.count),
        }

"""The epochs of a run: build the trainer, resume, then per epoch loaders, steps, evaluation,
metrics and a checkpoint."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.engine import dist
from train.engine.build import build_trainer, configure_torch
from train.engine.dist import DistEnv, all_reduce_max, all_reduce_sum, rank_zero_agreed
from train.engine.launch import is_main_process, say
from train.engine.loop import EvalSums, SyncPoint, TrainState, evaluate, train_steps
from train.engine.step import resolve_precision
from train.errors import Interrupted, TrainError
from train.plan.config import Recipe, RunConfig
from train.plan.evals import evaluates_after, is_new_best, stop_reached
from train.plan.phases import LoadedSchedule
from train.plan.rebuilds import loader_settings
from train.plan.schedule import Schedule
from train.plan.world_size import plan_world
from train.run import checkpoint as ckpt
from train.run.metrics import RunLog, config_record, epoch_record, now, read_metrics
from train.run.report import format_targets, time_to_targets
from train.run.resume import check_ranks_agree, check_resume_on, check_step_in_epoch, resume_path
from train.run.run_dir import clear_outputs
from train.run.shards import DataSource, LiveLoaders
from train.run.signals import StopFlag


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
        # The phases file's schedule (tuned for recipe.tuned_num_gpus) and the one this world
        # size trains (train.plan.world_size; a resume on another world size re-plans it).
        self.file_schedule, self.out_dir = loaded.schedule, config.run_dir
        self.world = plan_world(
            loaded.schedule, recipe.tuned_num_gpus, env.world_size, config.global_batch
        )
        self.schedule = self.world.schedule
        self.precision = resolve_precision(config.precision, env.device)
        configure_torch(config, env.device)
        resume_from = resume_path(self.out_dir, config.resume, config.overwrite)
        if config.overwrite or resume_from is None:  # nothing there that resume_path keeps
            cleared = rank_zero_agreed(env, lambda: clear_outputs(self.out_dir))
            if cleared:
                say(
                    f"{self.out_dir}: removed the old run's {', '.join(cleared)} "
                    f"({'--overwrite' if config.overwrite else 'nothing trained to resume'})"
                )
        self.trainer = build_trainer(
            config, recipe, env, num_classes, self.precision, apply_init=resume_from is None
        )
        self.identity = {
            "arch": recipe.arch,
            "num_classes": num_classes,
            "recipe": recipe.to_dict(),
            "schedule": self.schedule.to_dicts(),
            "seed": config.seed,
            "world_size": env.world_size,  # the one "schedule" is planned for (resume keeps it)
            "precision": self.precision,
            "sync_bn": config.sync_bn,
        }
        self.state = TrainState()
        self.resumed_from = resume_from
        resumed = self.resume(resume_from) if resume_from is not None else None
        check_ranks_agree(env, resumed is not None, self.state)
        for line in self.world.lines:
            say(line)
        self.loaders = LiveLoaders(data, env, config, self.schedule, recipe)
        trained = dataclasses.replace(loaded, schedule=self.schedule)
        record = config_record(config, trained, recipe, env, num_classes, self.precision, resumed)
        self.log = rank_zero_agreed(env, lambda: self.open_log(record, resumed)) or RunLog(
            self.out_dir, enabled=False
        )
        self.clock: float | None = None  # when this process started timing

    def resume(self, path: Path) -> dict[str, Any]:
        """Load, check (train.run.resume.check_resume) and restore `path`; what config.json
        records about it."""
        saved = ckpt.load(path)
        self.identity, changes, moved = check_resume_on(
            saved, path, self.identity, self.planned_at, self.config.allow_changed
        )
        if moved is not None:  # another world size: the checkpoint's global batch kept
            self.world, self.schedule = moved, moved.schedule
        try:
            ckpt.restore(saved, self.state, self.trainer)
        except TrainError as exc:
            raise TrainError(f"{path}: {exc}") from None
        return {
            "path": str(path),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "allowed_changes": changes,
            "world_size_change": moved.lines[0] if moved is not None else None,
        }

    def planned_at(self, world_size: int) -> Schedule:
        """The schedule this run's inputs plan for `world_size` ranks (train.plan.world_size)."""
        tuned, mode = self.recipe.tuned_num_gpus, self.config.global_batch
        return plan_world(self.file_schedule, tuned, world_size, mode).schedule

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
        for line in self.world.lines:  # the global batch on this world size
            log.event(line)
        return log

    def elapsed_now(self) -> float:
        """Seconds of training and evaluation so far, over all processes of this run."""
        return self.state.elapsed_s + (now() - self.clock if self.clock is not None else 0.0)

    def save(self, *, final: bool = False, record: dict[str, Any] | None = None) -> None:
        """All ranks, same point: rank 0 writes `record` and the checkpoint, every rank learns
        how that went; non-finite weights are never saved (docs/DESIGN.md, Saving)."""
        parameters = [p.detach() for p in self.trainer.module.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()):
            raise TrainError(
                f"weights are no longer finite at epoch {self.state.epoch} step "
                f"{self.state.step}; stopping without saving: {self.kept()}"
            )
        rank_zero_agreed(self.env, lambda: self.write_outputs(final, record))

    def write_outputs(self, final: bool, record: dict[str, Any] | None) -> None:
        best = False
        try:
            if record is not None:
                # metrics.jsonl holds this run's earlier epochs (a resume dropped later ones)
                best = is_new_best(self.earlier_records(), record)
                self.log.epoch(record)
        except TrainError as exc:  # the metrics line (train.run.metrics says which file)
            raise TrainError(f"{exc}; {self.kept()}") from None
        saved = ckpt.capture(self.state, self.trainer, self.identity, self.elapsed_now())
        ckpt.save_run(saved, self.out_dir, final, best=best)

    def earlier_records(self) -> list[dict[str, Any]]:
        try:
            return read_metrics(self.out_dir)
        except FileNotFoundError:  # the first epoch's record is not written yet
            return []

    def release(self) -> None:  # the DDP model must go before its process group (dist.shutdown)
        self.trainer = None

    def kept(self) -> str:
        return ckpt.last_kept(self.out_dir)

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
                stopped = "stopped_at" in records[-1]  # the same on every rank (all-reduced)
                self.save(final=state.epoch == schedule.num_epochs or stopped, record=records[-1])
                if stopped:
                    self.log.event(self.stopped_text(records[-1]))
                    break
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
        check_step_in_epoch(self.resumed_from, state, steps)
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
        recipe = self.recipe
        if evaluates_after(epoch, self.schedule.num_epochs, recipe.eval_every, recipe.eval_offset):
            started = now()
            flip = self.recipe.val_flip_tta and last_epoch
            top = self.evaluate(self.trainer.module, flip) | {"flip_tta": flip}
            if self.trainer.ema is not None:
                ema_top = self.evaluate(self.trainer.ema.module, flip)
                top.update(ema_top1=ema_top["top1"], ema_top5=ema_top["top5"])
            state.eval_s += now() - started
        phase, world_size = self.schedule.phases[phase_index], self.env.world_size
        record = epoch_record(state, self.elapsed_now(), top, lr, phase_index, phase, world_size)
        if not last_epoch and stop_reached(record, self.config.stop_at):
            record["stopped_at"] = dict(self.config.stop_at)
        if record["top1"] is not None:
            say(
                f"epoch {epoch}: top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  "
                f"loss {record['train_loss']:.3f}  {record['img_per_s']:,.0f} img/s  "
                f"data-wait {100 * record['data_wait']:.0f}%  {record['hours']:.4f} h"
            )
        return record

    def stopped_text(self, record: dict[str, Any]) -> str:
        reached = ", ".join(f"{m} {record[m]:.2f}% >= {v:g}%" for m, v in self.config.stop_at)
        text = f"Stopped early after epoch {record['epoch']} (--stop-at): {reached}"
        say(text)
        return text

    def evaluate(self, module: nn.Module, flip: bool) -> dict[str, Any]:
        dist.broadcast_buffers(self.env, module)
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

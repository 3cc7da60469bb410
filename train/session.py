"""A training session: model, optimizer, EMA and position, and the epoch loop that moves them.

Collective discipline (DDP): the steps of an epoch, the sync points (every `log_every` steps,
every checkpoint step, the last step), evaluation and the end-of-epoch stop check happen at
the same (epoch, step) on every rank, and each sync point is ONE all-reduce of a small tensor
(loss sum, batch count, data-wait seconds, stop flag). Decisions (stop, NaN) are taken from
the reduced values, so every rank takes them together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train import checkpoint as ckpt
from train.dist import DistEnv, all_reduce_max, all_reduce_sum, barrier, broadcast_buffers, \
    is_main_process
from train.loop import EvalSums, Trainer, autocast, evaluate, make_mix, make_scaler, \
    resolve_precision, step_seed
from train.metrics import RunLog, now
from train.model import Recipe, build_model, build_optimizer, zero_init_last_bn
from train.report import format_targets, time_to_targets
from train.run import (DataSource, Interrupted, Loaders, RunConfig, StopFlag, TrainError,
                       default_out_dir, run_config_record, say)
from train.schedule import LoadedSchedule


class Session:
    def __init__(self, config: RunConfig, loaded: LoadedSchedule, recipe: Recipe,
                 data: DataSource, env: DistEnv, num_classes: int, stop: StopFlag) -> None:
        self.config, self.recipe, self.env, self.stop = config, recipe, env, stop
        self.loaded, self.schedule = loaded, loaded.schedule
        self.num_classes = num_classes
        self.device = env.device
        self.precision = resolve_precision(config.precision, self.device)
        self.out_dir = default_out_dir(config)
        self._configure_torch()
        resume_from = ckpt.resume_path(self.out_dir, config.resume)

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = build_model(recipe, num_classes)
        if recipe.zero_init_residual and zero_init_last_bn(model) == 0:
            say(f"note: zero_init_residual has no effect on {recipe.arch} (no ResNet blocks)")
        if recipe.blurpool:
            say("note: the recipe asks for BlurPool, which this trainer does not implement; "
                "training without it")
        if config.sync_bn:
            if self.device.type != "cuda":
                raise TrainError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.module = model.to(self.device, memory_format=memory_format)
        self.ema = None
        if recipe.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.module, use_buffers=True,
                                     multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay))
        self.optimizer = build_optimizer(self.module, recipe, self.device)
        self.scaler = make_scaler(self.device, self.precision)

        # Position: the next step to run is `step` of `epoch`; sums of the epoch so far.
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.elapsed_s = 0.0  # training + evaluation time before this process started
        self.eval_s = 0.0
        self._clock: float | None = None  # when this process started timing
        self.partial = _new_partial()
        resumed = self._resume(resume_from) if resume_from is not None else None
        self._check_ranks_agree(resumed is not None)

        self.model: nn.Module = self.module
        if env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (BN statistics) stay per rank while training; rank 0's are broadcast
            # before each evaluation and are what checkpoints hold.
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=ids, broadcast_buffers=False,
                gradient_as_bucket_view=True)
        if config.compile:
            # Static shapes: one graph per (batch, crop) of the schedule, all warmed before
            # timing, rather than a slower dynamic-shape graph after the second shape.
            self.model = torch.compile(self.model, dynamic=False)
        self.trainer = Trainer(self.model, self.optimizer, self.device, self.precision,
                               recipe.label_smoothing, self.scaler,
                               make_mix(recipe.mixup_alpha, recipe.cutmix_alpha, num_classes),
                               self.ema, self.module)
        self.loaders = Loaders(data, env, config)
        self.data = data
        self.log = RunLog(self.out_dir, enabled=is_main_process(),
                          tensorboard=config.tensorboard,
                          resume_epoch=self.epoch if resumed else None)
        if self.log.enabled:  # rank 0: git and version probes run once
            self.log.write_config(run_config_record(config, loaded, recipe, env, num_classes,
                                                    self.precision, resumed),
                                  resumed=bool(resumed))
        if resumed:
            self.log.event(f"Resumed from {resumed['path']} at epoch {self.epoch} step "
                           f"{self.step}")
        tuned = recipe.tuned_num_gpus
        if tuned is not None and tuned != env.world_size:
            say(f"note: this schedule's LRs were tuned for {tuned} GPU(s); this run has "
                f"{env.world_size}, so its global batch is {env.world_size}/{tuned} of the "
                "tuned one at the same LR (batch_size is per GPU)")

    def _configure_torch(self) -> None:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        deterministic = (config.deterministic if config.deterministic is not None
                         else self.device.type == "cpu")
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not deterministic
            torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left
            torch.backends.cudnn.allow_tf32 = True

    # --- checkpoints ------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "version": ckpt.CHECKPOINT_VERSION, "arch": self.recipe.arch,
            "num_classes": self.num_classes, "recipe": self.recipe.to_dict(),
            "schedule": self.schedule.to_dicts(), "seed": self.config.seed,
            "world_size": self.env.world_size, "precision": self.precision,
            "epoch": self.epoch, "step": self.step, "global_step": self.global_step,
            "elapsed_s": self.elapsed_now(), "eval_s": self.eval_s,
            "partial": dict(self.partial),
            "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": ckpt.rng_state(),
        }

    def elapsed_now(self) -> float:
        """Seconds of training and evaluation so far, over all processes of this run."""
        return self.elapsed_s + (now() - self._clock if self._clock is not None else 0.0)

    def save(self, *, final: bool = False) -> None:
        """All ranks call this (same point); rank 0 writes, then everyone waits for it.

        Refuses weights that are no longer finite: a step can turn them to inf/NaN from a
        finite loss (checked only before the step), and saving them would overwrite the last
        good checkpoint. DDP keeps parameters identical on every rank, so every rank reaches
        the same decision without a collective; one host sync per save."""
        norms = torch._foreach_norm([p.detach() for p in self.module.parameters()])
        if not math.isfinite(float(torch.stack(norms).sum())):
            last = ckpt.checkpoint_dir(self.out_dir) / ckpt.LAST_NAME
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainError(f"weights are no longer finite at epoch {self.epoch} step {self.step}; "
                             f"stopping without saving: {kept}")
        if is_main_process():
            state = self._state()
            directory = ckpt.checkpoint_dir(self.out_dir)
            ckpt.save_atomic(state, directory / ckpt.LAST_NAME)
            if final:
                ckpt.save_atomic(state, directory / ckpt.FINAL_NAME)
        barrier(self.env)

    def _resume(self, path: Path) -> dict[str, Any]:
        state = ckpt.load(path)
        if state["schedule"] != self.schedule.to_dicts():
            raise TrainError(f"{path}: the schedule differs from {self.config.phases_path}; "
                             "resume with the phases file the run started with")
        if (state["arch"], state["num_classes"]) != (self.recipe.arch, self.num_classes):
            raise TrainError(f"{path}: holds {state['arch']} with {state['num_classes']} "
                             f"classes, this run builds {self.recipe.arch} with "
                             f"{self.num_classes}")
        if state["step"] > 0 and state["world_size"] != self.env.world_size:
            raise TrainError(f"{path}: stopped mid-epoch with world size {state['world_size']}; "
                             f"resume it with the same number of processes (not "
                             f"{self.env.world_size}) or from an epoch-end checkpoint")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        ckpt.restore_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.global_step = state["global_step"]
        self.elapsed_s, self.eval_s = state["elapsed_s"], state["eval_s"]
        self.partial = dict(state["partial"])
        return {"path": str(path), "epoch": self.epoch, "step": self.step}

    def _check_ranks_agree(self, resuming: bool) -> None:
        """Every rank resumes from the same position, or none does (one min and one max)."""
        if not self.env.distributed:
            return
        position = [float(resuming), float(self.epoch), float(self.step)]
        high = all_reduce_max(self.env, torch.tensor(position, device=self.device))
        low = -all_reduce_max(self.env, -torch.tensor(position, device=self.device))
        if not torch.equal(high, low):
            mine = f"epoch {self.epoch} step {self.step}" if resuming else "a fresh start"
            raise TrainError(f"ranks disagree on the resume point (rank {self.env.rank} sees "
                             f"{mine}); put --out on storage that every node shares")

    # --- the loop ---------------------------------------------------------------------------

    def train(self, targets: dict[str, float]) -> dict[str, Any]:
        schedule, config = self.schedule, self.config
        if self.epoch >= schedule.num_epochs:
            say(f"{self.out_dir}: the run is already complete ({schedule.num_epochs} epochs)")
            return {}
        if config.compile:
            self._warm_up()
        self._clock = now()
        records: list[dict[str, Any]] = []
        try:
            while self.epoch < schedule.num_epochs:
                record = self._train_epoch()
                records.append(record)
                self.log.epoch(record)
                self.epoch, self.step, self.partial = self.epoch + 1, 0, _new_partial()
                self.save(final=self.epoch == schedule.num_epochs)
                flag = torch.tensor([float(self.stop.requested)], device=self.device)
                if self.epoch < schedule.num_epochs and all_reduce_max(self.env, flag).item():
                    raise Interrupted(f"stopped after epoch {self.epoch - 1}; checkpoint "
                                      f"saved; continue with --resume auto")
        finally:
            self.loaders.close()
            self.log.close()
        from train.metrics import read_metrics

        history = read_metrics(self.out_dir) if is_main_process() else records
        summary = format_targets(time_to_targets(history, targets))
        last = history[-1] if history else {}
        say(f"done: top-1 {last.get('top1', float('nan')):.2f}%  top-5 "
            f"{last.get('top5', float('nan')):.2f}%  in {last.get('hours', 0):.4f} h\n{summary}")
        self.log.event(summary)
        return last

    def _train_epoch(self) -> dict[str, Any]:
        from tqdm import tqdm

        env, config, epoch = self.env, self.config, self.epoch
        phase_index = self.schedule.phase_index_at(epoch)
        phase = self.schedule.phases[phase_index]
        loader, events = self.loaders.train_for(phase)
        for text in events:
            self.log.event(text)
        steps = len(loader)
        if steps == 0:
            raise TrainError(f"epoch {epoch}: the train loader has no batches (batch_size "
                             f"{phase.batch_size} x {env.world_size} ranks > images?)")
        bar = tqdm(total=steps, initial=self.step, disable=not (config.progress and
                   is_main_process()), desc=f"epoch {epoch}/{self.schedule.num_epochs} "
                   f"{phase.crop_size}px", leave=True, dynamic_ncols=True)
        lr = self.schedule.lr_at(epoch, min(self.step, steps - 1), steps)
        try:
            if self.step < steps:  # a stop at an epoch's last step resumes into its eval
                lr = self._run_steps(loader, phase, steps, bar)
        finally:
            bar.close()
        return self._finish_epoch(phase, phase_index, lr)

    def _run_steps(self, loader, phase, steps: int, bar) -> float:
        """Steps self.step .. steps-1 of this epoch; returns the LR of the last one."""
        env, config, epoch = self.env, self.config, self.epoch
        loader.set_epoch(epoch, self.step)
        interval = _Interval(self.device)
        batches = self.data.prefetcher(loader, self.device, config.channels_last)
        wait_seen, lr = 0.0, 0.0
        every = config.checkpoint_every_steps
        for step, (x, labels) in enumerate(batches, start=self.step):
            lr = self.schedule.lr_at(epoch, step, steps)
            seed = step_seed(config.seed, epoch, step, env.rank)
            interval.add(self.trainer.step(x, labels, lr, seed), labels.shape[0])
            self.step, self.global_step = step + 1, self.global_step + 1
            checkpoint_due = bool(every) and self.global_step % every == 0 and step + 1 < steps
            if (checkpoint_due or (step + 1) % config.log_every == 0 or step + 1 == steps
                    or (not env.distributed and self.stop.requested)):
                wait = getattr(batches, "data_wait_seconds", 0.0)
                synced = interval.sync(env, wait - wait_seen, self.stop.requested)
                wait_seen = wait
                self._account(synced, epoch, step, lr, bar)
                if synced["stop"] or checkpoint_due:
                    self.save()
                if synced["stop"]:
                    raise Interrupted(f"stopped at epoch {epoch} step {self.step}; "
                                      "checkpoint saved; continue with --resume auto")
            if self.step >= steps:
                return lr
        raise TrainError(f"epoch {epoch}: the train loader stopped after {self.step} of its "
                         f"{steps} batches")

    def _account(self, synced: dict[str, float], epoch: int, step: int, lr: float,
                 bar) -> None:
        """Fold one sync point into the epoch sums; stop on a non-finite loss."""
        if not math.isfinite(synced["loss_sum"]):
            last = ckpt.checkpoint_dir(self.out_dir) / ckpt.LAST_NAME
            kept = f"the last good checkpoint is {last}" if last.exists() else \
                "no checkpoint was written yet"
            raise TrainError(f"loss is {synced['loss_sum']} at epoch {epoch} step {step} "
                             f"(lr {lr:.4g}); stopping without saving: {kept}")
        p = self.partial
        p["loss_sum"] += synced["loss_sum"]
        p["batches"] += synced["batches"]
        p["images"] += synced["images"]
        p["data_wait_s"] += synced["data_wait_s"]
        p["train_s"] += synced["seconds"]
        rate = synced["images"] / synced["seconds"] if synced["seconds"] > 0 else 0.0
        loss = synced["loss_sum"] / max(synced["batches"], 1)
        wait = synced["data_wait_s"] / max(synced["seconds"] * self.env.world_size, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} img/s loss {loss:.3f} lr {lr:.4g} "
                            f"data-wait {100 * wait:.0f}%", refresh=False)
        bar.update(step + 1 - bar.n)
        self.log.scalars(self.global_step, {"loss": loss, "lr": lr, "img_per_s": rate,
                                            "data_wait": wait})

    def _finish_epoch(self, phase, phase_index: int, lr: float) -> dict[str, Any]:
        env, config, epoch = self.env, self.config, self.epoch
        p = self.partial
        last_epoch = epoch == self.schedule.num_epochs - 1
        record: dict[str, Any] = {"epoch": epoch}
        top = {"top1": None, "top5": None, "val_images": None}
        if last_epoch or (epoch + 1) % max(config.eval_every, 1) == 0:
            started = now()
            flip = self.recipe.val_flip_tta and last_epoch
            top = self._evaluate(self.module, phase, flip)
            if self.ema is not None:
                ema_top = self._evaluate(self.ema.module, phase, flip)
                record.update(ema_top1=ema_top["top1"], ema_top5=ema_top["top5"])
            self.eval_s += now() - started
            record["flip_tta"] = flip
        hours = self.elapsed_now() / 3600
        record.update(
            hours=hours, train_hours=hours - self.eval_s / 3600, **top,
            train_loss=p["loss_sum"] / max(p["batches"], 1), lr=lr,
            img_per_s=p["images"] / p["train_s"] if p["train_s"] > 0 else 0.0,
            data_wait=p["data_wait_s"] / max(p["train_s"] * env.world_size, 1e-9),
            phase=phase_index, crop_size=phase.crop_size, batch_size=phase.batch_size,
            global_batch_size=phase.batch_size * env.world_size, world_size=env.world_size)
        if top["top1"] is not None:
            say(f"epoch {epoch}: top-1 {top['top1']:.2f}%  top-5 {top['top5']:.2f}%  "
                f"loss {record['train_loss']:.3f}  {record['img_per_s']:,.0f} img/s  "
                f"data-wait {100 * record['data_wait']:.0f}%  {hours:.4f} h")
        return record

    def _evaluate(self, module: nn.Module, phase, flip: bool) -> dict[str, float]:
        broadcast_buffers(self.env, module)
        loader = self.loaders.val_for(phase)
        batches = self.data.prefetcher(loader, self.device, self.config.channels_last)
        sums = evaluate(module, batches, self.device, self.precision, flip)
        result = EvalSums.from_tensor(all_reduce_sum(self.env, sums))
        # val_images: how many images the metrics counted, summed over ranks; it must equal the
        # validation set's size (padded duplicates would inflate it).
        return {"top1": result.top1, "top5": result.top5, "val_loss": result.loss,
                "val_images": int(result.count)}

    def _warm_up(self) -> None:
        """Compile each remaining phase's training shape before the clock starts.

        A forward and backward per (batch, crop) shape, no optimizer step; BN statistics are
        restored afterwards, so the warm-up leaves the model exactly as it was.
        """
        saved = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        shapes = sorted({(p.batch_size, p.crop_size) for p in
                         self.schedule.phases[self.schedule.phase_index_at(self.epoch):]})
        memory_format = torch.channels_last if self.config.channels_last else \
            torch.contiguous_format
        for batch_size, crop_size in shapes:
            say(f"compiling for batch {batch_size} x {crop_size} px")
            x = torch.randn(batch_size, 3, crop_size, crop_size, device=self.device)
            x = x.contiguous(memory_format=memory_format)
            labels = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            with autocast(self.device, self.precision):
                logits = self.model(x)
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            self.optimizer.zero_grad(set_to_none=True)
        self.module.load_state_dict(saved)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _new_partial() -> dict[str, float]:
    """Sums over the epoch so far, kept in checkpoints so a resumed epoch reports the whole."""
    return {"loss_sum": 0.0, "batches": 0.0, "images": 0.0, "data_wait_s": 0.0, "train_s": 0.0}


class _Interval:
    """Loss and counts since the last sync point, accumulated on the device (no host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.batches = 0
        self.images = 0
        self.started = now()

    def add(self, loss: torch.Tensor, num_images: int) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.images += num_images

    def sync(self, env: DistEnv, data_wait_s: float, stop: bool) -> dict[str, float]:
        """One all-reduce: sums over ranks of loss, batches, images, data wait and stop."""
        values = torch.stack([self.loss_sum, *(torch.tensor(
            v, dtype=torch.float64, device=self.device)
            for v in (self.batches, self.images, data_wait_s, float(stop)))])
        loss_sum, batches, images, wait, stop_votes = all_reduce_sum(env, values).tolist()
        seconds = now() - self.started
        self._reset()
        return {"loss_sum": loss_sum, "batches": batches, "images": images,
                "data_wait_s": wait, "stop": stop_votes > 0, "seconds": seconds}

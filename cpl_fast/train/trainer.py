"""The training loop: data, model, objective, optimiser, schedule, EMA, logging, checkpoints, DDP.

``Trainer(config, run_dir)`` builds everything by name from a validated config (see
``cpl_fast.config``); ``fit()`` trains to the configured number of optimiser steps. The
objective is a step function from ``cpl_fast.train.steps.STEPS`` (``literal``, ``loop``, ``fast``:
the CPL steps; ``l1``: plain L1, for the dense and sparse baselines without CPR).

Reproducibility: the batches come from ``TaskBalancedSampler`` (a function of seed, epoch and
position), the negatives from a dedicated ``torch.Generator``, so a run restarted from a checkpoint
with ``resume=True`` replays exactly what the uninterrupted run would have done
(``cpl_fast.train.rng_state`` lists what a checkpoint keeps for that).

Distributed (``torchrun``, ``cpl_fast.train.distributed``): the step runs inside DDP's forward (a
wrapper module, ``cpl_fast.train.steps.runner``), so DDP sees one forward per backward and averages
gradients; negatives are drawn for the global batch.

Messages go to the ``cpl_fast.train`` logger and ``RUN/train.log``, metrics to TensorBoard and W&B,
all through one ``RunLog`` (``cpl_fast.train.run_log``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from cpl_fast import memory
from cpl_fast._deprecated import REMOVED_IN
from cpl_fast.config import ConfigError, as_settings, router_balance
from cpl_fast.data import (
    EvalDataset,
    TaskBalancedSampler,
    TrainDataset,
    build_task_ids,
    worker_init_fn,
)
from cpl_fast.data.sources import data_sources
from cpl_fast.inference.restoration import autocast
from cpl_fast.losses import build_features, build_loss
from cpl_fast.losses.negatives import build_negative_sampler
from cpl_fast.metrics.routing import prompt_gap_db
from cpl_fast.models import Routing
from cpl_fast.models.registry import model_from_config
from cpl_fast.runs.checkpoints import load_newest_checkpoint, save_best, save_checkpoint
from cpl_fast.train.cpr_weight import CprWeight
from cpl_fast.train.distributed import DistInfo, GlobalBatchSampler, init_distributed, resolve_device
from cpl_fast.train.ema import EMA
from cpl_fast.train.health import TrainingHealth
from cpl_fast.train.progress import BarPostfix, log_group, step_line
from cpl_fast.train.rng_state import capture_rng, capture_trainer_state, restore_rng, restore_trainer_state
from cpl_fast.train.router_balance import load_balancing_loss, update_route_bias
from cpl_fast.train.run_log import RunLog, log_message
from cpl_fast.train.schedule import build_optimizer, build_scheduler
from cpl_fast.train.steps import STEPS, StepFn, l1_step, resolve_objective
from cpl_fast.train.steps.output import CPLStepOutput
from cpl_fast.train.steps.runner import StepContext, StepModule
from cpl_fast.train.validations import Validations, validation_values

# Kept importable from here: the commands and older callers read them from this module.
__all__ = ["STEPS", "DistInfo", "GlobalBatchSampler", "StepContext", "StepFn", "StepModule", "Trainer",
           "Validate", "capture_rng", "init_distributed", "l1_step", "resolve_device", "resolve_objective",
           "restore_rng"]

# validate(model) -> {"scores": {task: scores}, "images": {name: (3, H, W) tensor}}; see Trainer.fit.
Validate = Callable[[nn.Module], Mapping[str, Any]]


class Trainer:
    """Builds a run from a validated config and trains it (``fit``); ``resume=True`` continues the
    newest checkpoint of ``run_dir`` exactly."""

    def __init__(self, config: Mapping[str, Any], run_dir: str | Path, resume: bool = False,
                 process: DistInfo | None = None, log: Callable[[str], None] | None = log_message, *,
                 info: DistInfo | None = None) -> None:
        """``process``: this process's rank in a distributed job (None: a single process). ``log``: where
        messages go besides ``RUN/train.log``: the ``cpl_fast.train`` logger by default, None for nowhere,
        or any callable taking one message. ``info``: the old name of ``process``, for one release."""
        if info is not None:
            warnings.warn(f"Trainer(info=...) is now Trainer(process=...); the old name will be removed in "
                          f"cpl_fast {REMOVED_IN}", DeprecationWarning, stacklevel=2)
            process = process or info
        self.config = config
        self.settings = as_settings(config)
        self.router_balance = router_balance(config)  # auto resolved once: read on every step
        self.run_dir = Path(run_dir)
        self.process = process or DistInfo()
        self.log = RunLog(log if self.process.is_main else None)
        # The order matters: the device before anything is placed on it, the seed before anything
        # random (data, weights, features), the model before what reads it (negative sampler,
        # optimiser), the run's length before the schedule, and every part before the checkpoint is read
        # into it.
        self._build_device()
        self.objective, step = resolve_objective(self.settings.objective)
        self._seed()
        self._build_data()
        self.model = self._build_model()
        self.ema = self._build_ema()
        self.context = self._build_context()
        self.step_module, self.runner = self._build_runner(step)
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.total_steps = self._total_steps()
        self.scheduler = self._build_scheduler()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.settings.amp == "fp16")
        self._init_records()
        if resume:
            self._resume()

    # ------------------------------------------------------------------------------ building

    def _build_device(self) -> None:
        settings = self.settings
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.device = resolve_device(settings.device, self.process)
        if settings.amp != "none" and self.device.type != "cuda":
            raise ConfigError(f"amp={settings.amp} needs a CUDA GPU; this run is on {self.device}")
        self.dtype = torch.float64 if settings.precision == "float64" else torch.float32

    def _seed(self) -> None:
        seed = self.settings.seed
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def _build_ema(self) -> EMA | None:
        ema = self.settings.ema
        return EMA(self.model, ema.decay) if ema.enabled else None

    def _build_runner(self, step: StepFn) -> tuple[StepModule, nn.Module]:
        """The step as a module, and what runs it: the module itself, or its DDP wrapper in a job."""
        step_module = StepModule(self.model, step)
        if not self.process.enabled:
            return step_module, step_module
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # No find_unused_parameters: each prompt bank is one parameter, so every parameter gets a
        # gradient at every step.
        return step_module, DDP(step_module, device_ids=device_ids)

    def _build_scheduler(self, start: int = 0):
        sched = self.settings.schedule
        return build_scheduler(self.optimizer, sched.name, self.total_steps, sched.warmup_epochs,
                               sched.schedule_epochs, sched.min_lr, start=start)

    def _init_records(self) -> None:
        """The run's position and records, all empty at the start (a checkpoint fills them on resume)."""
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.history: list[dict[str, float]] = []
        self.cpr_weight = CprWeight(self.settings)
        self.records = Validations()
        self.health = TrainingHealth(self.model, self.config, self.log)
        self._iterator = None

    def _build_data(self) -> None:
        data = self.settings.data
        self.train_source, self.test_source = data_sources(self.config["data"])
        tasks = list(self.train_source.tasks) + (list(self.test_source.tasks) if self.test_source else [])
        self.task_ids = build_task_ids(tasks)
        self.num_tasks = len(set(self.task_ids[t] for t in self.train_source.tasks))
        self.train_set = TrainDataset(self.train_source, patch_size=data.crop, seed=self.settings.seed,
                                      task_ids=self.task_ids, augment=data.augment,
                                      skip_unreadable=data.skip_unreadable)
        self.data_sampler = TaskBalancedSampler(self.train_set.labels, num_samples=data.samples_per_epoch,
                                                seed=self.settings.seed, balanced=data.balanced,
                                                rank=self.process.rank, world_size=self.process.world_size)
        self.batches_per_epoch = self.data_sampler.per_rank // data.batch
        if self.batches_per_epoch < 1:
            raise ConfigError(f"an epoch has {self.data_sampler.per_rank} samples per process, fewer than "
                              f"data.batch={data.batch}; raise data.samples_per_epoch or lower the batch")
        self.loader_generator = torch.Generator().manual_seed(self.settings.seed)
        self.loader = DataLoader(self.train_set, batch_size=data.batch, sampler=self.data_sampler,
                                 drop_last=True, num_workers=data.num_workers,
                                 worker_init_fn=worker_init_fn, generator=self.loader_generator,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=False)
        self.eval_set = (EvalDataset(self.test_source, seed=self.settings.seed, task_ids=self.task_ids)
                         if self.test_source is not None else None)

    def _cpu_allocator(self) -> contextlib.AbstractContextManager:
        """``train.cpu_allocator=caching`` on the CPU: freed blocks are kept for the next step (no page
        faults on every step's activations); the allocator before ``fit`` comes back after it."""
        if self.device.type != "cpu" or self.settings.train.cpu_allocator == "system":
            return contextlib.nullcontext()
        if not memory.cpu_caching_available():
            self.log("train.cpu_allocator=caching: the compiled extension is unavailable, so CPU tensors "
                     "come from the system allocator (same results, slower steps)")
            return contextlib.nullcontext()
        return memory.cpu_caching()

    def _build_model(self) -> nn.Module:
        return model_from_config(self.config["model"]).to(self.device, self.dtype)

    def _build_context(self) -> StepContext:
        cpr = self.settings.cpr
        generator = torch.Generator(device=self.device).manual_seed(self.settings.seed + 1)
        if self.objective == "l1":
            return StepContext(None, None, None, 0, generator)
        features = build_features(cpr.features, **cpr.feature_options).to(self.device, self.dtype)
        cpr_loss = build_loss({"type": "cpr", "alpha": cpr.alpha, "form": cpr.form,
                               "distance": cpr.distance, "anchor_grad": cpr.anchor_grad,
                               "margin": cpr.margin, "tau": cpr.tau})
        if cpr.negative_sampler == "other_task":
            negatives = build_negative_sampler("other_task", num_tasks=self.num_tasks,
                                               memory_size=cpr.memory_size)
        else:
            negatives = build_negative_sampler("mismatched_experts", num_prompts=self.model.num_prompts)
        self.negative_sampler = negatives
        if self.process.enabled:
            negatives = GlobalBatchSampler(negatives, self.process)
        neg_chunk = cpr.neg_chunk if self.objective == "fast" else None
        return StepContext(features, cpr_loss, negatives, cpr.m, generator, neg_chunk, cpr.neg_grad,
                           negatives_per_step=cpr.negatives_per_step)

    def _total_steps(self) -> int:
        train = self.settings.train
        if train.iterations is not None:
            return train.iterations
        steps = train.epochs * self.batches_per_epoch // self.settings.optim.accumulate
        if steps < 1:
            raise ConfigError("train.epochs gives no optimiser step; raise it or set train.iterations")
        return steps

    # ------------------------------------------------------------------------------ state

    def trainer_state(self) -> dict[str, Any]:
        return capture_trainer_state(self)

    def position(self) -> dict[str, Any]:
        """Where the run stands (step, epoch, data order), for the checkpoint's state.json."""
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "sampler": {"epoch": self.epoch, "seed": self.data_sampler.seed,
                            "start": self.batches_in_epoch * self.settings.data.batch},
                "world_size": self.process.world_size, "total_steps": self.total_steps,
                "objective": self.objective}

    def info_json(self) -> dict[str, Any]:
        """The old name of :meth:`position`, for one release."""
        warnings.warn(f"Trainer.info_json() is now Trainer.position(); the old name will be removed in "
                      f"cpl_fast {REMOVED_IN}", DeprecationWarning, stacklevel=2)
        return self.position()

    @property
    def info(self) -> DistInfo:
        """The old name of :attr:`process`, for one release."""
        warnings.warn(f"Trainer.info is now Trainer.process; the old name will be removed in cpl_fast "
                      f"{REMOVED_IN}", DeprecationWarning, stacklevel=2)
        return self.process

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; the others wait)."""
        path = None
        if self.process.is_main:
            path = save_checkpoint(self.run_dir, self.step, self.model, self.trainer_state(),
                                   self.position(), ema=self.ema.module if self.ema else None,
                                   keep=self.settings.checkpoint.keep)
        if self.process.enabled:
            dist.barrier()
        return path

    def _resume(self) -> None:
        # The newest checkpoint that reads whole (an older one, with a warning, when it is damaged).
        ema = self.ema.module if self.ema else None
        folder, position, state = load_newest_checkpoint(self.run_dir, self.model, ema, map_location="cpu")
        if position["world_size"] != self.process.world_size:
            raise ConfigError(f"checkpoint {folder} was written by {position['world_size']} process(es); "
                              f"resume it with the same number (this job has {self.process.world_size})")
        self.step, self.epoch = position["step"], position["epoch"]
        self.batches_in_epoch = position["batches_in_epoch"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved_total = position.get("total_steps", self.total_steps)
        if saved_total != self.total_steps and self.step < self.total_steps:
            self._relay_schedule(saved_total)
        restore_trainer_state(self, state)
        self.log(f"resumed {self.run_dir} at step {self.step} "
                 f"(epoch {self.epoch}, batch {self.batches_in_epoch})")

    def _relay_schedule(self, saved_total: int) -> None:
        """A run resumed with a new length (``train.iterations``): the schedule is laid over the new
        length and continues from the current step (the warm-up, long done, is not repeated)."""
        sched = self.settings.schedule
        before = self.scheduler.get_last_lr()[0]
        self.scheduler = self._build_scheduler(start=self.step)
        self.log(f"the run was {saved_total} steps long and is now {self.total_steps}: the {sched.name} "
                 f"schedule is laid over {self.total_steps} steps and continues at step {self.step} "
                 f"(learning rate {before:.3g} -> {self.scheduler.get_last_lr()[0]:.3g})")

    # ------------------------------------------------------------------------------ loop

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.batches_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batches_in_epoch, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self.data_sampler.set_epoch(self.epoch)
            self.data_sampler.set_start(self.batches_in_epoch * self.settings.data.batch)
            self._iterator = iter(self.loader)
        item = next(self._iterator)
        self.batches_in_epoch += 1
        move = dict(device=self.device, non_blocking=True)
        return (item["input"].to(dtype=self.dtype, **move), item["target"].to(dtype=self.dtype, **move),
                item["task_id"].to(**move))

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.settings.amp)

    def cpr_alpha(self, step: int) -> float:
        """The CPR weight at optimiser step ``step`` (:class:`CprWeight`)."""
        return self.cpr_weight.alpha(step)

    @property
    def cpr_calibration(self) -> dict[str, float]:
        """alpha / tau measured on the first CPR batch (empty before it, or when nothing is calibrated)."""
        return self.cpr_weight.calibration

    @torch.no_grad()
    def _calibration_losses(self, batch: Sequence) -> tuple[float, float]:
        """``(L1, mean L_pos)`` of one batch at alpha 1, averaged over the processes, drawn with a copy
        of the negatives' generator so the run's draws are unchanged."""
        loss = self.context.cpr_loss
        saved_alpha, saved_tau = loss.alpha, loss.tau
        generator = torch.Generator(device=self.context.generator.device)
        generator.set_state(self.context.generator.get_state())
        context = dataclasses.replace(self.context, generator=generator, l1_only=False)
        loss.alpha, loss.tau = 1.0, saved_tau or 1.0
        try:
            with self._autocast():
                out = self.step_module(batch, context)
        finally:
            loss.alpha, loss.tau = saved_alpha, saved_tau
        values = torch.stack([out.l1.detach().double(), out.l_pos.detach().double().mean()])
        if self.process.enabled:
            dist.all_reduce(values)
            values /= self.process.world_size
        return float(values[0]), float(values[1])

    def _prepare_cpr(self, batch: Sequence) -> None:
        """This step's CPR settings: warm-up, calibration, alpha."""
        if self.context.cpr_loss is not None:
            self.context.l1_only = self.cpr_weight.prepare(
                self.context.cpr_loss, self.step, lambda: self._calibration_losses(batch), self.log)

    def _router_loss(self, out: CPLStepOutput) -> torch.Tensor | None:
        router = self.settings.router
        if self.router_balance != "aux_loss" or router.aux_weight == 0:
            return None
        return router.aux_weight * load_balancing_loss(out.routing, self.model.num_prompts)

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``optim.accumulate`` micro-batches; returns the logged terms."""
        accumulate = self.settings.optim.accumulate
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "l1": 0.0, "cpr": 0.0, "l_pos": 0.0, "l_neg": 0.0}
        extras: dict[str, float] = {}
        routings, task_ids = [], []
        for micro in range(accumulate):
            batch = self._next_batch()
            if micro == 0:
                self._prepare_cpr(batch)
            last = micro == accumulate - 1
            sync = contextlib.nullcontext() if last or not self.process.enabled else self.runner.no_sync()
            with sync:
                with self._autocast():
                    out = self.runner(batch, self.context)
                    loss = out.loss
                    aux = self._router_loss(out)
                    if aux is not None:
                        loss = loss + aux
                        extras["router_aux"] = (extras.get("router_aux", 0.0)
                                                + float(aux.detach()) / accumulate)
                if micro == 0 and self.health.wants_grad_ratio(self.step, out, self.process.enabled):
                    extras["grad_ratio"] = self.health.grad_ratio(out)
                self.scaler.scale(loss / accumulate).backward()
            for key in sums:
                value = getattr(out, key)
                sums[key] += float(value.detach().float().mean()) / accumulate if value.numel() else 0.0
            if out.negative_images is not None and out.negative_images.numel():
                extras["prompt_gap"] = extras.get("prompt_gap", 0.0) + prompt_gap_db(
                    out.restored, out.negative_images, batch[1]) / accumulate
            routings.append([r.indices.detach() for r in out.routing])
            task_ids.append(batch[2])
        if self.router_balance == "bias":
            merged = [Routing(torch.cat([r[level] for r in routings]), torch.empty(0))
                      for level in range(len(routings[0]))]
            update_route_bias(self.model, merged, self.settings.router.bias_rate, self.process.enabled)
        self.health.observe([torch.cat([r[level] for r in routings]) for level in range(len(routings[0]))],
                            torch.cat(task_ids))
        sums["alpha"] = self.context.cpr_loss.alpha if self.context.cpr_loss is not None else 0.0
        sums.update(extras)
        grad_clip = self.settings.optim.grad_clip
        if grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return sums

    def eval_model(self) -> nn.Module:
        """The weights to evaluate: the EMA when enabled, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def fit(self, validate: Validate | None = None) -> list[dict[str, float]]:
        """Train until ``total_steps``; checkpoint every ``checkpoint.every`` steps and at the end.

        ``validate(model)`` (rank 0) scores the model every ``eval.every`` steps and after the last:
        it returns ``{"scores": per-task scores as cpl_fast.eval.evaluate gives them, "images": {name:
        (3, H, W) tensor}}``; the scores go to the log, TensorBoard and W&B, and with
        ``checkpoint.keep_best`` the best average PSNR so far is kept in ``RUN/checkpoints/best``.
        """
        from tqdm.auto import tqdm

        cfg = self.settings
        if self.process.is_main:
            self.log.open(self.run_dir)
        self.log.open_metrics(self.config, self.run_dir, self.step, enabled=self.process.is_main)
        # A bar only on a terminal: redirected output gets one plain line every log_every steps instead
        # of carriage-return updates.
        self.bar_shown = cfg.logging.progress and self.process.is_main and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.name} [{self.objective}]",
                   disable=not self.bar_shown, dynamic_ncols=True)
        start_step, started = self.step, time.perf_counter()
        try:
            with self._cpu_allocator():
                self._fit_steps(bar, start_step, started, validate)
            path = self.save()
            self.log(f"checkpoint {path}")
        finally:
            bar.close()
            self.log.close()
        return self.history

    def _fit_steps(self, bar, start_step: int, started: float, validate: Validate | None) -> None:
        """The step loop of ``fit``: step, log, validate, checkpoint every ``checkpoint.every`` steps."""
        cfg = self.settings
        images_per_step = cfg.data.batch * cfg.optim.accumulate * self.process.world_size
        log_every, eval_every = cfg.train.log_every, cfg.eval.every
        gaps: list[float] = []
        postfix = BarPostfix()
        while self.step < self.total_steps:
            tick = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]  # the rate this step trains with
            terms = self.train_step()
            elapsed = time.perf_counter() - tick
            terms.update(lr=lr, seconds=elapsed, step=self.step,
                         images_per_s=images_per_step / max(elapsed, 1e-9))
            if "prompt_gap" in terms:
                gaps.append(terms["prompt_gap"])
            last = self.step == self.total_steps
            if self.step % log_every == 0 or last:
                gap = sum(gaps) / len(gaps) if gaps else None
                gaps.clear()
                terms.update(self.health.summary(self.step, gap))
            self.history.append(terms)
            # The postfix first, then the count: the bar shows this step's numbers with this step.
            bar.set_postfix(**postfix(terms, lr), refresh=False)
            bar.update(1)
            self.log.scalars({key: value for key, value in terms.items() if key != "step"}, self.step,
                             log_group)
            if self.step % log_every == 0 or last:
                self.log(step_line(terms, self.step, self.total_steps, start_step, started),
                         file_only=self.bar_shown)
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"the loss is {terms['loss']} at step {self.step}")
            if validate is not None and self.process.is_main and eval_every and (self.step % eval_every == 0
                                                                                 or last):
                self._validate(validate)
            if self.step % cfg.checkpoint.every == 0 and not last:
                path = self.save()
                self.log(f"checkpoint {path}")

    def _validate(self, validate: Validate) -> None:
        """Score the evaluation weights, report the scores, keep the best (``checkpoint.keep_best``)."""
        result = validate(self.eval_model())
        scores = result["scores"]
        if not scores:
            return
        values = validation_values(scores)
        self.log.scalars(values, self.step, lambda key: "eval")
        self.log.images(result.get("images") or {}, self.step)
        per_task = ", ".join(f"{task} {s['psnr']:.2f}" for task, s in scores.items())
        self.log(f"validation at step {self.step}: PSNR {values['psnr']:.2f} dB, SSIM {values['ssim']:.4f} "
                 f"({per_task})")
        if self.records.add(self.step, values, keep_best=self.settings.checkpoint.keep_best):
            path = save_best(self.run_dir, self.model, self.records.best,
                             ema=self.ema.module if self.ema is not None else None)
            self.log(f"best so far (PSNR {values['psnr']:.2f} dB at step {self.step}): {path}")

    @property
    def validations(self) -> list[dict[str, float]]:
        """The scores of each validation so far (``eval.every``)."""
        return self.records.records

    @property
    def best(self) -> dict[str, float] | None:
        """``checkpoint.keep_best``: the best validation so far."""
        return self.records.best

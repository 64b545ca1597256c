"""The training loop: data, model, objective, optimiser, schedule, EMA, logging, checkpoints, DDP.

``Trainer(config, run_dir)`` builds everything by name from a validated config (see
``cpl_fast.config``); ``fit()`` trains to the configured number of optimiser steps. The
objective is a step function from ``STEPS`` (``literal``, ``loop``, ``fast``: the CPL steps; ``l1``:
plain L1, for the dense and sparse baselines without CPR), all with the signature
``step(model, batch, features, cpr_loss, sampler, m, generator) -> CPLStepOutput``.

Reproducibility: the batches come from ``TaskBalancedSampler`` (a function of seed, epoch and
position), the negatives from a dedicated ``torch.Generator``, so a run restarted from a checkpoint
with ``resume=True`` replays exactly what the uninterrupted run would have done.

Distributed (``torchrun``): each process takes every ``world_size``-th sample of the same stream;
the step runs inside DDP's forward (a wrapper module), so DDP sees one forward per backward and
averages gradients. Negatives are drawn for the global batch (routings and task ids are gathered)
with the same generator on every rank, so ``N`` processes with batch ``b`` compute what one process
with batch ``N b`` computes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from cpl_fast import memory
from cpl_fast.config import ConfigError, model_k_n, router_balance
from cpl_fast.data import (
    EvalDataset,
    TaskBalancedSampler,
    TrainDataset,
    build_task_ids,
    worker_init_fn,
)
from cpl_fast.data.sources import data_sources
from cpl_fast.losses import CPRLoss, build_features
from cpl_fast.losses.negatives import OtherTask, build_negative_sampler
from cpl_fast.metrics.protocols import average
from cpl_fast.metrics.routing import prompt_gap_db
from cpl_fast.models import Routing
from cpl_fast.models.registry import model_from_config
from cpl_fast.runs.checkpoints import load_newest_checkpoint, save_best, save_checkpoint
from cpl_fast.train.ema import EMA
from cpl_fast.train.health import TrainingHealth
from cpl_fast.train.literal_step import literal_cpl_step
from cpl_fast.train.loop_step import loop_cpl_step
from cpl_fast.train.router_balance import load_balancing_loss, update_route_bias
from cpl_fast.train.run_log import MetricSinks, RunLog, console_echo
from cpl_fast.train.schedule import build_scheduler
from cpl_fast.train.step_inputs import unpack_batch
from cpl_fast.train.step_output import CPLStepOutput

StepFn = Callable[..., CPLStepOutput]


# --------------------------------------------------------------------------------- step registry

def l1_step(model: nn.Module, batch: Sequence, features: nn.Module | None = None,
            cpr_loss: nn.Module | None = None, sampler: Any = None, m: int = 0,
            generator: torch.Generator | None = None) -> CPLStepOutput:
    """Plain L1 restoration loss (no CPR): the objective of the dense and sparse baselines."""
    degraded, target, _ = unpack_batch(batch)
    restored, routing = model(degraded, return_routing=True)
    l1 = (restored - target).abs().mean()
    zero = l1.new_zeros(())
    empty = l1.new_zeros(degraded.shape[0])
    return CPLStepOutput(loss=l1, l1=l1, cpr=zero, l_pos=empty, l_neg=empty, restored=restored,
                         routing=list(routing), negatives=[])


def _fast_step() -> StepFn:
    try:
        module = importlib.import_module("cpl_fast.train.fast_step")
        return module.fast_cpl_step
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"objective 'fast' needs cpl_fast.train.fast_step.fast_cpl_step, which is not "
                          f"available ({exc}); use objective loop or literal") from exc


# Resolvers, so an objective whose module is missing fails only when it is asked for.
STEPS: dict[str, Callable[[], StepFn]] = {
    "literal": lambda: literal_cpl_step,
    "loop": lambda: loop_cpl_step,
    "fast": _fast_step,
    "l1": lambda: l1_step,
}


def resolve_objective(name: str) -> tuple[str, StepFn]:
    """``(name, step)``; ``auto`` is ``fast`` when its module imports, else ``loop`` (the name says which)."""
    if name == "auto":
        try:
            return "fast", _fast_step()
        except ConfigError:
            return "loop", loop_cpl_step
    if name not in STEPS:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(STEPS)} or auto")
    return name, STEPS[name]()


HEALTH_KEYS = ("prompt_gap", "grad_ratio", "router_aux")


def _log_group(key: str) -> str:
    """``health`` for the training-health signals, ``train`` for the losses and rates."""
    return "health" if key in HEALTH_KEYS or key.startswith(("usage_entropy_l", "task_info_l")) else "train"


# ----------------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before NCCL starts, so each rank talks from its own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank)


class GlobalBatchSampler:
    """Draws negatives for the global batch of a DDP job and returns this rank's rows.

    Routings (detached) and task ids of every rank are gathered and put in the order one process
    would see them (rank ``r``'s row ``i`` is global row ``i * world_size + r``, as the data sampler
    interleaves); every rank calls the wrapped sampler with the same generator state on the same
    global batch, so all ranks draw the same negatives, and the same as one process would.
    """

    def __init__(self, inner: Any, info: DistInfo) -> None:
        self.inner, self.info = inner, info
        if hasattr(inner, "sample_level"):
            self.sample_level = self._sample_level

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.info.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        # (W, b, ...) -> (b, W, ...) -> (b W, ...): interleaved like the data sampler's shards.
        return torch.stack(parts).transpose(0, 1).reshape(-1, *tensor.shape[1:])

    def _gather_routing(self, routing: Routing) -> Routing:
        probs = None if routing.probs is None else self._gather(routing.probs)
        return Routing(self._gather(routing.indices), self._gather(routing.weights), probs)

    def _mine(self, routing: Routing) -> Routing:
        r, w = self.info.rank, self.info.world_size
        probs = None if routing.probs is None else routing.probs[r::w]
        return Routing(routing.indices[r::w], routing.weights[r::w], probs)

    def __call__(self, routings: Sequence[Routing], m: int, task_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> list[list[Routing]]:
        tasks = None if task_ids is None else self._gather(task_ids)
        gathered = [self._gather_routing(r) for r in routings]
        negatives = self.inner(gathered, m, task_ids=tasks, generator=generator)
        return [[self._mine(r) for r in negative] for negative in negatives]

    def _sample_level(self, level: int, routing: Routing, m: int, task_ids: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> list[Routing]:
        tasks = None if task_ids is None else self._gather(task_ids)
        negatives = self.inner.sample_level(level, self._gather_routing(routing), m, task_ids=tasks,
                                            generator=generator)
        return [self._mine(r) for r in negatives]


class StepModule(nn.Module):
    """The model with its objective as ``forward``: DDP wraps one whole step (one forward, one backward)."""

    def __init__(self, model: nn.Module, step: StepFn) -> None:
        super().__init__()
        self.model = model
        self.step = step

    def forward(self, batch: Sequence, context: StepContext) -> CPLStepOutput:
        if context.l1_only or context.cpr_loss is None:
            return l1_step(self.model, batch)
        extra = {} if context.neg_chunk is None else {"neg_chunk": context.neg_chunk}
        if context.neg_grad != "all":
            extra["neg_grad"] = context.neg_grad
        if context.negatives_per_step is not None:
            extra["negatives_per_step"] = context.negatives_per_step
        return self.step(self.model, batch, features=context.features, cpr_loss=context.cpr_loss,
                         sampler=context.sampler, m=context.m, generator=context.generator, **extra)


# validate(model) -> {"scores": {task: scores}, "images": {name: (3, H, W) tensor}}; see Trainer.fit.
Validate = Callable[[nn.Module], Mapping[str, Any]]


@dataclass
class StepContext:
    """What a step needs besides the model and the batch (kept out of DDP's module tree)."""

    features: nn.Module | None
    cpr_loss: nn.Module | None
    sampler: Any
    m: int
    generator: torch.Generator
    neg_chunk: int | None = None  # objective fast only
    neg_grad: str = "all"         # where the negatives' gradient goes (cpl_fast.train.negative_grad)
    l1_only: bool = False         # CPR warm-up: this step is plain L1
    negatives_per_step: int | None = None  # objective fast only: negatives decoded per step


# ------------------------------------------------------------------------------------------ data

# --------------------------------------------------------------------------------------- trainer

def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available")
        if name == "cuda":
            return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    return torch.device(name)


def capture_rng() -> dict[str, Any]:
    """Global RNG states: torch CPU (and CUDA), numpy, Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Builds a run from a validated config and trains it (``fit``); ``resume=True`` continues the
    newest checkpoint of ``run_dir`` exactly."""

    def __init__(self, config: Mapping[str, Any], run_dir: str | Path, resume: bool = False,
                 info: DistInfo | None = None, log: Callable[[str], None] | None = console_echo) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.info = info or DistInfo()
        # Messages go to ``log`` (the console by default; None: silent) and to RUN/train.log (rank 0).
        self.log = RunLog(log if self.info.is_main else None)
        if config["threads"] is not None:
            torch.set_num_threads(config["threads"])
        self.device = resolve_device(config["device"], self.info)
        if config["amp"] != "none" and self.device.type != "cuda":
            raise ConfigError(f"amp={config['amp']} needs a CUDA GPU; this run is on {self.device}")
        self.dtype = torch.float64 if config["precision"] == "float64" else torch.float32
        self.objective, step = resolve_objective(config["objective"])
        seed = config["seed"]
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

        self._build_data()
        self.model = self._build_model().to(self.device, self.dtype)
        self.ema = EMA(self.model, config["ema"]["decay"]) if config["ema"]["enabled"] else None
        self.context = self._build_context()
        self.step_module = StepModule(self.model, step)
        self.runner: nn.Module = self.step_module
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # No find_unused_parameters: each prompt bank is one parameter, so every parameter gets a
            # gradient at every step.
            self.runner = DDP(self.step_module, device_ids=device_ids)
        optim = config["optim"]
        cls = torch.optim.AdamW if optim["name"] == "adamw" else torch.optim.Adam
        self.optimizer = cls(self.model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]),
                             weight_decay=optim["weight_decay"])
        self.total_steps = self._total_steps()
        sched = config["schedule"]
        self.scheduler = build_scheduler(self.optimizer, sched["name"], self.total_steps,
                                         sched["warmup_epochs"], sched["schedule_epochs"], sched["min_lr"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=config["amp"] == "fp16")
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.history: list[dict[str, float]] = []
        # alpha / tau set from the first CPR batch (cpr.alpha_relative, logistic tau: null): saved with
        # the trainer state so a resumed run keeps them.
        self.cpr_calibration: dict[str, float] = {}
        self.validations: list[dict[str, float]] = []   # eval.every: the scores of each validation
        self.best: dict[str, float] | None = None         # checkpoint.keep_best: the best validation
        self.health = TrainingHealth(self.model, self.config, self.log)
        self._iterator = None
        if resume:
            self._resume()

    # ------------------------------------------------------------------------------ building

    def _build_data(self) -> None:
        data = self.config["data"]
        self.train_source, self.test_source = data_sources(data)
        tasks = list(self.train_source.tasks) + (list(self.test_source.tasks) if self.test_source else [])
        self.task_ids = build_task_ids(tasks)
        self.num_tasks = len(set(self.task_ids[t] for t in self.train_source.tasks))
        self.train_set = TrainDataset(self.train_source, patch_size=data["crop"], seed=self.config["seed"],
                                      task_ids=self.task_ids, augment=data["augment"],
                                      skip_unreadable=data["skip_unreadable"])
        self.sampler = TaskBalancedSampler(self.train_set.labels, num_samples=data["samples_per_epoch"],
                                           seed=self.config["seed"], balanced=data["balanced"],
                                           rank=self.info.rank, world_size=self.info.world_size)
        self.batches_per_epoch = self.sampler.per_rank // data["batch"]
        if self.batches_per_epoch < 1:
            raise ConfigError(f"an epoch has {self.sampler.per_rank} samples per process, fewer than "
                              f"data.batch={data['batch']}; raise data.samples_per_epoch or lower the batch")
        self.loader_generator = torch.Generator().manual_seed(self.config["seed"])
        self.loader = DataLoader(self.train_set, batch_size=data["batch"], sampler=self.sampler,
                                 drop_last=True, num_workers=data["num_workers"],
                                 worker_init_fn=worker_init_fn, generator=self.loader_generator,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=False)
        self.eval_set = (EvalDataset(self.test_source, seed=self.config["seed"], task_ids=self.task_ids)
                         if self.test_source is not None else None)

    def _cpu_allocator(self) -> contextlib.AbstractContextManager:
        """``train.cpu_allocator=caching`` on the CPU: freed blocks are kept for the next step (no page
        faults on every step's activations); the allocator before ``fit`` comes back after it."""
        if self.device.type != "cpu" or self.config["train"]["cpu_allocator"] == "system":
            return contextlib.nullcontext()
        if not memory.cpu_caching_available():
            self.log("train.cpu_allocator=caching: the compiled extension is unavailable, so CPU tensors "
                     "come from the system allocator (same results, slower steps)")
            return contextlib.nullcontext()
        return memory.cpu_caching()

    def _build_model(self) -> nn.Module:
        return model_from_config(self.config["model"])

    def _build_context(self) -> StepContext:
        cpr = self.config["cpr"]
        generator = torch.Generator(device=self.device).manual_seed(self.config["seed"] + 1)
        if self.objective == "l1":
            return StepContext(None, None, None, 0, generator)
        features = build_features(cpr["features"], **cpr["feature_options"]).to(self.device, self.dtype)
        cpr_loss = CPRLoss(alpha=cpr["alpha"], form=cpr["form"], distance=cpr["distance"],
                           anchor_grad=cpr["anchor_grad"], margin=cpr["margin"], tau=cpr["tau"])
        _, n = model_k_n(self.config)
        if cpr["sampler"] == "other_task":
            sampler = build_negative_sampler("other_task", num_tasks=self.num_tasks, memory_size=cpr["memory_size"])
        else:
            sampler = build_negative_sampler("mismatched_experts", num_prompts=n)
        self.negative_sampler = sampler
        if self.info.enabled:
            sampler = GlobalBatchSampler(sampler, self.info)
        neg_chunk = cpr["neg_chunk"] if self.objective == "fast" else None
        per_step = cpr["negatives_per_step"] if self.objective == "fast" else None
        return StepContext(features, cpr_loss, sampler, cpr["m"], generator, neg_chunk, cpr["neg_grad"],
                           negatives_per_step=per_step)

    def _total_steps(self) -> int:
        train = self.config["train"]
        if train["iterations"] is not None:
            return train["iterations"]
        steps = train["epochs"] * self.batches_per_epoch // self.config["optim"]["accumulate"]
        if steps < 1:
            raise ConfigError("train.epochs gives no optimiser step; raise it or set train.iterations")
        return steps

    # ------------------------------------------------------------------------------ state

    def _sampler_memory(self) -> Any:
        sampler = getattr(self, "negative_sampler", None)
        if isinstance(sampler, OtherTask):
            return [list(entries) for entries in sampler.memory]
        return None

    def trainer_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": capture_rng(),
                "negative_generator": self.context.generator.get_state(),
                "loader_generator": self.loader_generator.get_state(),
                "sampler_memory": self._sampler_memory(), "history": self.history,
                "cpr_calibration": dict(self.cpr_calibration), "health": self.health.state_dict(),
                "validations": list(self.validations), "best": self.best}

    def info_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "sampler": {"epoch": self.epoch, "seed": self.sampler.seed,
                            "start": self.batches_in_epoch * self.config["data"]["batch"]},
                "world_size": self.info.world_size, "total_steps": self.total_steps,
                "objective": self.objective}

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; the others wait)."""
        path = None
        if self.info.is_main:
            path = save_checkpoint(self.run_dir, self.step, self.model, self.trainer_state(),
                                   self.info_json(), ema=self.ema.module if self.ema else None,
                                   keep=self.config["checkpoint"]["keep"])
        if self.info.enabled:
            dist.barrier()
        return path

    def _resume(self) -> None:
        # The newest checkpoint that reads whole (an older one, with a warning, when it is damaged).
        ema = self.ema.module if self.ema else None
        folder, info, state = load_newest_checkpoint(self.run_dir, self.model, ema, map_location="cpu")
        if info["world_size"] != self.info.world_size:
            raise ConfigError(f"checkpoint {folder} was written by {info['world_size']} process(es); resume "
                              f"it with the same number (this job has {self.info.world_size})")
        self.step, self.epoch, self.batches_in_epoch = info["step"], info["epoch"], info["batches_in_epoch"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved_total = info.get("total_steps", self.total_steps)
        if saved_total != self.total_steps and self.step < self.total_steps:
            self._relay_schedule(saved_total)
        self.scaler.load_state_dict(state["scaler"])
        self.context.generator.set_state(state["negative_generator"])
        self.loader_generator.set_state(state["loader_generator"])
        if state["sampler_memory"] is not None:
            for entries, saved in zip(self.negative_sampler.memory, state["sampler_memory"], strict=True):
                entries.clear()
                entries.extend(tuple((i.to(self.device), w.to(self.device)) for i, w in row) for row in saved)
        self.history = list(state["history"])
        self.cpr_calibration = dict(state.get("cpr_calibration") or {})
        self.health.load_state_dict(state.get("health") or {})
        self.validations = list(state.get("validations") or [])
        self.best = state.get("best")
        restore_rng(state["rng"])
        self.log(f"resumed {self.run_dir} at step {self.step} "
                 f"(epoch {self.epoch}, batch {self.batches_in_epoch})")

    def _relay_schedule(self, saved_total: int) -> None:
        """A run resumed with a new length (``train.iterations``): the schedule is laid over the new
        length and continues from the current step (the warm-up, long done, is not repeated)."""
        sched = self.config["schedule"]
        before = self.scheduler.get_last_lr()[0]
        self.scheduler = build_scheduler(self.optimizer, sched["name"], self.total_steps,
                                         sched["warmup_epochs"], sched["schedule_epochs"], sched["min_lr"],
                                         start=self.step)
        self.log(f"the run was {saved_total} steps long and is now {self.total_steps}: the {sched['name']} "
                 f"schedule is laid over {self.total_steps} steps and continues at step {self.step} "
                 f"(learning rate {before:.3g} -> {self.scheduler.get_last_lr()[0]:.3g})")

    # ------------------------------------------------------------------------------ loop

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.batches_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batches_in_epoch, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.batches_in_epoch * self.config["data"]["batch"])
            self._iterator = iter(self.loader)
        item = next(self._iterator)
        self.batches_in_epoch += 1
        move = dict(device=self.device, non_blocking=True)
        return (item["input"].to(dtype=self.dtype, **move), item["target"].to(dtype=self.dtype, **move),
                item["task_id"].to(**move))

    def _autocast(self) -> contextlib.AbstractContextManager:
        amp = self.config["amp"]
        if amp == "none":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def cpr_alpha(self, step: int) -> float:
        """The CPR weight at optimiser step ``step``: 0 during ``cpr.warmup_steps``, then ramped in."""
        cpr = self.config["cpr"]
        base = self.cpr_calibration.get("alpha", cpr["alpha"])
        start, ramp = cpr["warmup_steps"], cpr["ramp_steps"]
        if step < start:
            return 0.0
        if ramp > 0:
            return base * min(1.0, (step - start + 1) / ramp)
        return base

    def _needs_calibration(self) -> bool:
        cpr = self.config["cpr"]
        if self.objective == "l1":
            return False
        want_alpha = cpr["alpha_relative"] is not None and "alpha" not in self.cpr_calibration
        want_tau = cpr["form"] == "logistic" and cpr["tau"] is None and "tau" not in self.cpr_calibration
        return want_alpha or want_tau

    @torch.no_grad()
    def _calibrate(self, batch: Sequence) -> None:
        """Set alpha (``alpha * L_pos = alpha_relative * L1``) and the logistic tau (``L_pos``) from one
        batch, with a copy of the negatives' generator so the run's draws are unchanged."""
        cpr = self.config["cpr"]
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
        if self.info.enabled:
            dist.all_reduce(values)
            values /= self.info.world_size
        l1, l_pos = float(values[0]), float(values[1])
        if not (math.isfinite(l_pos) and l_pos > 0):
            raise FloatingPointError(f"cannot calibrate CPR: L_pos of the first batch is {l_pos}")
        if cpr["alpha_relative"] is not None and "alpha" not in self.cpr_calibration:
            self.cpr_calibration["alpha"] = cpr["alpha_relative"] * l1 / l_pos
        if cpr["form"] == "logistic" and cpr["tau"] is None and "tau" not in self.cpr_calibration:
            self.cpr_calibration["tau"] = l_pos
        self.log(f"CPR calibrated on the first batch (L1 {l1:.4g}, L_pos {l_pos:.4g}): "
                 + ", ".join(f"{key} = {value:.4g}" for key, value in self.cpr_calibration.items()))

    def _prepare_cpr(self, batch: Sequence) -> None:
        """This step's CPR settings: warm-up, calibration, alpha."""
        if self.context.cpr_loss is None:
            return
        alpha = self.cpr_alpha(self.step)
        self.context.l1_only = alpha == 0.0 and self.config["cpr"]["warmup_steps"] > self.step
        if self.context.l1_only:
            self.context.cpr_loss.alpha = 0.0
            return
        if self._needs_calibration():
            self._calibrate(batch)
        self.context.cpr_loss.alpha = self.cpr_alpha(self.step)
        if "tau" in self.cpr_calibration:
            self.context.cpr_loss.tau = self.cpr_calibration["tau"]

    def _router_loss(self, out: CPLStepOutput) -> torch.Tensor | None:
        router = self.config["router"]
        if router_balance(self.config) != "aux_loss" or router["aux_weight"] == 0:
            return None
        return router["aux_weight"] * load_balancing_loss(out.routing, self.model.num_prompts)

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``optim.accumulate`` micro-batches; returns the logged terms."""
        accumulate = self.config["optim"]["accumulate"]
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
            sync = contextlib.nullcontext() if last or not self.info.enabled else self.runner.no_sync()
            with sync:
                with self._autocast():
                    out = self.runner(batch, self.context)
                    loss = out.loss
                    aux = self._router_loss(out)
                    if aux is not None:
                        loss = loss + aux
                        extras["router_aux"] = (extras.get("router_aux", 0.0)
                                                + float(aux.detach()) / accumulate)
                if micro == 0 and self.health.wants_grad_ratio(self.step, out, self.info.enabled):
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
        if router_balance(self.config) == "bias":
            merged = [Routing(torch.cat([r[level] for r in routings]), torch.empty(0))
                      for level in range(len(routings[0]))]
            update_route_bias(self.model, merged, self.config["router"]["bias_rate"], self.info.enabled)
        self.health.observe([torch.cat([r[level] for r in routings]) for level in range(len(routings[0]))],
                            torch.cat(task_ids))
        sums["alpha"] = self.context.cpr_loss.alpha if self.context.cpr_loss is not None else 0.0
        sums.update(extras)
        grad_clip = self.config["optim"]["grad_clip"]
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

        cfg = self.config
        if self.info.is_main:
            self.log.open(self.run_dir)
        sinks = MetricSinks(cfg, self.run_dir, self.step, enabled=self.info.is_main)
        # A bar only on a terminal: redirected output gets one plain line every log_every steps instead
        # of carriage-return updates.
        self.bar_shown = cfg["logging"]["progress"] and self.info.is_main and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg['name']} [{self.objective}]",
                   disable=not self.bar_shown, dynamic_ncols=True)
        start_step, started = self.step, time.perf_counter()
        try:
            with self._cpu_allocator():
                self._fit_steps(bar, sinks, start_step, started, validate)
            path = self.save()
            self.log(f"checkpoint {path}")
        finally:
            bar.close()
            sinks.close()
        return self.history

    def _fit_steps(self, bar, sinks: MetricSinks, start_step: int, started: float,
                   validate: Validate | None) -> None:
        """The step loop of ``fit``: step, log, validate, checkpoint every ``checkpoint.every`` steps."""
        cfg = self.config
        images_per_step = cfg["data"]["batch"] * cfg["optim"]["accumulate"] * self.info.world_size
        log_every, eval_every = cfg["train"]["log_every"], cfg["eval"]["every"]
        gaps: list[float] = []
        shown: dict[str, float] = {}       # the latest health values, for the progress bar
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
            shown.update({key: value for key, value in terms.items() if key == "prompt_gap"
                          or key.startswith("task_info_l")})
            health = {}
            if "prompt_gap" in shown:
                health["gap_db"] = f"{shown['prompt_gap']:.1f}"
            infos = [v for k, v in shown.items() if k.startswith("task_info_l")]
            if infos:
                health["task_bits"] = f"{max(infos):.2f}"
            # The postfix first, then the count: the bar shows this step's numbers with this step.
            bar.set_postfix(loss=f"{terms['loss']:.4f}", l1=f"{terms['l1']:.4f}", cpr=f"{terms['cpr']:.2e}",
                            lr=f"{lr:.1e}", img_s=f"{terms['images_per_s']:.1f}", **health, refresh=False)
            bar.update(1)
            sinks.scalars({key: value for key, value in terms.items() if key != "step"}, self.step,
                          _log_group)
            if self.step % log_every == 0 or last:
                self.log(self._step_line(terms, start_step, started), file_only=self.bar_shown)
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"the loss is {terms['loss']} at step {self.step}")
            if validate is not None and self.info.is_main and eval_every and (self.step % eval_every == 0
                                                                              or last):
                self._validate(validate, sinks)
            if self.step % cfg["checkpoint"]["every"] == 0 and not last:
                path = self.save()
                self.log(f"checkpoint {path}")

    def _step_line(self, terms: Mapping[str, float], start_step: int, started: float) -> str:
        done = self.step - start_step
        eta = (time.perf_counter() - started) / max(done, 1) * (self.total_steps - self.step)
        health = "".join(f" {key} {terms[key]:.2f}" for key in sorted(terms) if _log_group(key) == "health")
        return (f"step {self.step}/{self.total_steps} loss {terms['loss']:.5f} l1 {terms['l1']:.5f} "
                f"cpr {terms['cpr']:.3e} lr {terms['lr']:.2e} {terms['images_per_s']:.1f} img/s "
                f"eta {eta:.0f}s{health}")

    def _validate(self, validate: Validate, sinks: MetricSinks) -> None:
        """Score the evaluation weights, report the scores, keep the best (``checkpoint.keep_best``)."""
        result = validate(self.eval_model())
        scores = result["scores"]
        if not scores:
            return
        values = average(scores)  # the papers' unweighted mean over tasks, as cpl-eval reports it
        values.update({f"psnr_{task}": s["psnr"] for task, s in scores.items()})
        levels = len(next(iter(scores.values()))["levels"])
        for level in range(levels):
            values[f"selection_entropy_l{level}"] = float(np.mean(
                [s["levels"][level]["selection_entropy"] for s in scores.values() if s["levels"]]))
        sinks.scalars(values, self.step, lambda key: "eval")
        sinks.images(result.get("images") or {}, self.step)
        self.validations.append({"step": self.step, **values})
        per_task = ", ".join(f"{task} {s['psnr']:.2f}" for task, s in scores.items())
        self.log(f"validation at step {self.step}: PSNR {values['psnr']:.2f} dB, SSIM {values['ssim']:.4f} "
                 f"({per_task})")
        better = self.best is None or values["psnr"] > self.best["psnr"]
        if self.config["checkpoint"]["keep_best"] and better:
            self.best = {"step": self.step, **values}
            path = save_best(self.run_dir, self.model, self.best,
                             ema=self.ema.module if self.ema is not None else None)
            self.log(f"best so far (PSNR {values['psnr']:.2f} dB at step {self.step}): {path}")

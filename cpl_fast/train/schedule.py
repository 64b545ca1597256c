"""The optimiser and its learning-rate schedule, per optimiser step.

PromptIR trains 150 epochs with a linear warm-up over the first 15 epochs and a cosine decay after
(``LinearWarmupCosineAnnealingLR``, stepped per epoch). Here the same shape is laid over the run's
optimiser steps: the warm-up takes the same fraction of the run (15/150 by default), so a short
run keeps the recipe's proportions. The factor multiplies the optimiser's base learning rate.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """``factor(step)``: linear from ``1/warmup`` to 1 over ``warmup`` steps, then cosine to ``floor``.

    ``step`` counts optimiser steps from 0; step ``warmup - 1`` has factor 1 (the first step already
    learns: a zero first learning rate would waste it), step ``total`` would reach ``floor``. A
    class, not a lambda, so the scheduler's state pickles.
    """

    def __init__(self, warmup: int, total: int, floor: float = 0.0) -> None:
        if total < 1 or not 0 <= warmup < total:
            raise ValueError(f"need 0 <= warmup < total and total >= 1, got warmup={warmup}, total={total}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor (min_lr / lr) must be in [0, 1], got {floor}")
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min((step - self.warmup) / (self.total - self.warmup), 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Constant:
    """Factor 1 at every step."""

    def __call__(self, step: int) -> float:
        return 1.0


def warmup_iterations(warmup_epochs: float, schedule_epochs: float, total: int) -> int:
    """The warm-up length in steps: the recipe's fraction ``warmup_epochs / schedule_epochs`` of ``total``."""
    if schedule_epochs <= 0 or not 0 <= warmup_epochs < schedule_epochs:
        raise ValueError(f"need 0 <= warmup_epochs < schedule_epochs, got {warmup_epochs}, {schedule_epochs}")
    return min(int(round(total * warmup_epochs / schedule_epochs)), total - 1)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total: int, warmup_epochs: float = 15,
                    schedule_epochs: float = 150, min_lr: float = 0.0, start: int = 0) -> LambdaLR:
    """A per-step scheduler by name (``warmup_cosine`` or ``constant``) over ``total`` steps.

    ``start > 0``: the scheduler of a run that has taken ``start`` steps already (the optimiser holds its
    ``initial_lr``): the next step trains at ``factor(start)``. A run extended to a new length uses it
    to lay the schedule over the new ``total`` from where it stands.
    """
    if name not in ("constant", "warmup_cosine"):
        raise ValueError(f"unknown schedule {name!r}; choose warmup_cosine or constant")
    if start < 0 or (start > 0 and "initial_lr" not in optimizer.param_groups[0]):
        raise ValueError(f"start={start}: a scheduler can start late only on an optimiser that has been "
                         f"scheduled (its param groups hold initial_lr)")
    if name == "constant":
        return LambdaLR(optimizer, Constant(), last_epoch=start - 1)
    base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    floor = min_lr / base if base > 0 else 0.0
    if floor > 1.0:
        raise ValueError(f"schedule.min_lr={min_lr} exceeds the learning rate {base}")
    warmup = warmup_iterations(warmup_epochs, schedule_epochs, total)
    return LambdaLR(optimizer, WarmupCosine(warmup, total, floor), last_epoch=start - 1)


def build_optimizer(config: Mapping[str, Any], params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The config's ``optim`` section: ``adamw`` or ``adam`` over ``params``."""
    optim = config["optim"]
    cls = torch.optim.AdamW if optim["name"] == "adamw" else torch.optim.Adam
    return cls(params, lr=optim["lr"], betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"])

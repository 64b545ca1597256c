"""How the trainer calls a step: what it passes besides the batch, and the module DDP wraps.

DDP must see one forward per backward, so the whole step (model and objective) runs as the
``forward`` of ``StepModule``; what the step needs besides the model and the batch travels in a
``StepContext``, outside DDP's module tree.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cpl_fast.train.steps import StepFn
from cpl_fast.train.steps.l1 import l1_step
from cpl_fast.train.steps.output import CPLStepOutput


@dataclass
class StepContext:
    """What a step needs besides the model and the batch (kept out of DDP's module tree)."""

    features: nn.Module | None
    cpr_loss: nn.Module | None
    negative_sampler: Any
    m: int
    generator: torch.Generator
    neg_chunk: int | None = None  # objective fast only
    neg_grad: str = "all"         # where the negatives' gradient goes (cpl_fast.train.steps.negative_grad)
    l1_only: bool = False         # CPR warm-up: this step is plain L1
    negatives_per_step: int | None = None  # negatives decoded per step (None: all m)


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
                         negative_sampler=context.negative_sampler, m=context.m, generator=context.generator,
                         **extra)

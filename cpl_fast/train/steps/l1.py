"""The plain L1 step (no CPR): the objective of the dense and sparse baselines."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cpl_fast.train.steps.inputs import unpack_batch
from cpl_fast.train.steps.output import CPLStepOutput


def l1_step(model: nn.Module, batch: Sequence, features: nn.Module | None = None,
            cpr_loss: nn.Module | None = None, negative_sampler: Any = None, m: int = 0,
            generator: torch.Generator | None = None) -> CPLStepOutput:
    """Plain L1 restoration loss (no CPR); takes the CPL steps' arguments so the trainer calls every
    objective alike, and ignores all but ``model`` and ``batch``."""
    degraded, target, _ = unpack_batch(batch)
    restored, routing = model(degraded, return_routing=True)
    l1 = (restored - target).abs().mean()
    zero = l1.new_zeros(())
    empty = l1.new_zeros(degraded.shape[0])
    return CPLStepOutput(loss=l1, l1=l1, cpr=zero, l_pos=empty, l_neg=empty, restored=restored,
                         routing=list(routing), negatives=[])

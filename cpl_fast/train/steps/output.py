"""What one CPL training step returns, shared by every implementation of the step."""
from __future__ import annotations

from typing import NamedTuple

import torch

from cpl_fast.models.spm import Routing


class CPLStepOutput(NamedTuple):
    """Result of a CPL step, before ``backward`` (the caller calls it on ``loss``).

    ``loss = l1 + cpr`` (scalars); ``l_pos``, ``l_neg`` ``(B,)``: the layer-weighted contrastive
    distances, for logging; ``restored``: the positive restorations ``(B, ...)``; ``routing``: the
    positive's per-level batched routing; ``negatives``: the ``m`` per-level forced routings used
    (the ``r`` decoded ones under ``fast_cpl_step(negatives_per_step=r)``); ``negative_images``: the
    negatives' restorations ``(m, B, ...)`` (``(r, B, ...)`` likewise), detached (for the prompt gap;
    None where a step decoded none).
    """

    loss: torch.Tensor
    l1: torch.Tensor
    cpr: torch.Tensor
    l_pos: torch.Tensor
    l_neg: torch.Tensor
    restored: torch.Tensor
    routing: list[Routing]
    negatives: list[list[Routing]]
    negative_images: torch.Tensor | None = None

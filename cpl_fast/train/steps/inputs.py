"""Checks of a CPL step's inputs, shared by every implementation of the step."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from cpl_fast.models.spm import Routing


def unpack_batch(batch: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(degraded, target, task_ids or None)``; a 2-tuple means no task labels."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError("a CPL batch is (degraded, target) or (degraded, target, task_ids)")
    degraded, target = batch[0], batch[1]
    task_ids = batch[2] if len(batch) == 3 else None
    if degraded.shape[0] != target.shape[0]:
        raise ValueError(f"degraded and target batch sizes differ: {degraded.shape[0]} vs {target.shape[0]}")
    if task_ids is not None and tuple(task_ids.shape) != (degraded.shape[0],):
        raise ValueError(f"task_ids must have shape (B,) = ({degraded.shape[0]},), "
                         f"got {tuple(task_ids.shape)}")
    return degraded, target, task_ids


def check_negatives(negatives: Sequence[Sequence[Routing]], m: int, levels: int, batch: int) -> None:
    """``negatives``: ``m`` negatives, each ``levels`` routings with ``batch`` rows."""
    if len(negatives) != m:
        raise ValueError(f"expected m={m} negatives, got {len(negatives)}")
    for t, negative in enumerate(negatives):
        if len(negative) != levels:
            raise ValueError(f"negative {t} has {len(negative)} prompt levels, the model has {levels}")
        for level, routing in enumerate(negative):
            if routing.indices.shape[0] != batch or routing.weights.shape[0] != batch:
                raise ValueError(f"negative {t}, level {level}: routing covers {routing.indices.shape[0]} "
                                 f"samples, the batch has {batch}")


def check_neg_weights(neg_weights: torch.Tensor | None, batch: int, m: int) -> None:
    if neg_weights is not None and tuple(neg_weights.shape) != (batch, m):
        raise ValueError(f"neg_weights must be (B, m) = ({batch}, {m}), got {tuple(neg_weights.shape)}")

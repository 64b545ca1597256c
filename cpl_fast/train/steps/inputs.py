"""Checks of a CPL step's inputs, shared by every implementation of the step, and the choice of the
negatives a step decodes.

``negatives_per_step=r`` (``r < m``): a step decodes only ``r`` of the ``m`` negatives. Before anything
else it draws ``r`` distinct negative slots uniformly (``draw_negative_subset``, with the step's
generator); the ``m`` negatives are then drawn (or given) as usual, and only the chosen slots are
decoded and enter ``L_neg``, as the mean over the ``r`` of them (with their columns of
``neg_weights``). Each slot is kept with probability ``r / m``, so that mean is an unbiased estimate
of the full step's ``(1/m) sum_t w_t D_t`` per layer. The paper's ``difference`` form is linear in
``L_neg``, so its expected loss and expected gradient over the draw equal the full step's exactly.
The other forms are convex in ``L_neg`` (``ratio``: ``L_pos / (L_neg + eps)`` per layer;
``hinge``: ``relu(margin L_pos - L_neg)``; ``logistic``: ``softplus((L_pos - L_neg) / tau)``), so
their expected loss is at least the full step's (Jensen) and their expected gradient is the
gradient of that expectation (e.g. the expectation of a mean of hinges, each active on its own
draw), not the full step's: an r-subsampled hinge still pushes a sample's negatives on draws where
the full step's hinge is already satisfied, and the other way round. The literal, loop and fast
steps draw the same slots and negatives from the same generator state, so they still agree.
"""
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


def draw_negative_subset(m: int, r: int | None, generator: torch.Generator | None = None) -> list[int] | None:
    """The ``r`` negative slots (sorted) a step decodes out of ``m``, uniform without replacement.

    ``None`` (all ``m``, nothing drawn) when ``r`` is None or ``r == m``: the full step itself.
    Raises ``ValueError`` unless ``r`` is an int with ``1 <= r <= m``.
    """
    if r is None:
        return None
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= m:
        raise ValueError(f"negatives_per_step must be None or an int with 1 <= negatives_per_step <= m={m}, "
                         f"got {r!r}")
    if r == m:
        return None
    device = generator.device if generator is not None else torch.device("cpu")
    return sorted(torch.randperm(m, generator=generator, device=device)[:r].tolist())


def kept_negatives(m: int, r: int | None, generator: torch.Generator | None,
                   neg_weights: torch.Tensor | None) -> tuple[list[int], torch.Tensor | None]:
    """The negative slots a step decodes (``draw_negative_subset``, drawn before anything else so that
    the ``m`` negatives drawn after it are those of the full step) and their columns of ``neg_weights``."""
    subset = draw_negative_subset(m, r, generator)
    if subset is None:
        return list(range(m)), neg_weights
    return subset, None if neg_weights is None else neg_weights[:, subset]


def used_negatives(negatives: list, kept: list[int]) -> list:
    """The negatives of the slots ``kept``; the list itself when every slot is kept."""
    return negatives if len(kept) == len(negatives) else [negatives[t] for t in kept]

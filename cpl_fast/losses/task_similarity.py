"""Per-pair weights on CPR's negative term from a task-similarity matrix.

A negative drawn from a task very similar to the sample's own (light vs heavy rain, say) is a poor
negative: pushing the restoration away from it also pushes away from a nearly correct answer. So
each pair ``(b, t)`` gets weight ``1 - sim[task_b, task_{b,t}]``: a negative of an unrelated task
(similarity 0) counts fully, one of an identical task (similarity 1) not at all. The result feeds
``CPRLoss(..., neg_weights=...)``.
"""
from __future__ import annotations

import torch


def negative_weights_from_similarity(sim: torch.Tensor, pos_task: torch.Tensor,
                                     neg_task: torch.Tensor) -> torch.Tensor:
    """``w[b, t] = 1 - sim[pos_task[b], neg_task[b, t]]``.

    ``sim``: ``(T, T)`` with entries in ``[0, 1]`` (1 = same task); ``pos_task``: ``(B,)`` int;
    ``neg_task``: ``(B, m)`` int. Returns ``(B, m)`` in ``sim``'s dtype, on ``sim``'s device.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square (T, T) matrix, got shape {tuple(sim.shape)}")
    if sim.is_floating_point() is False:
        raise TypeError(f"sim must be a floating-point tensor, got {sim.dtype}")
    if bool(((sim < 0) | (sim > 1)).any()):
        raise ValueError("sim entries must lie in [0, 1] (1 = same task)")
    if pos_task.dim() != 1 or neg_task.dim() != 2 or neg_task.shape[0] != pos_task.shape[0]:
        raise ValueError(f"expected pos_task (B,) and neg_task (B, m), got {tuple(pos_task.shape)} and "
                         f"{tuple(neg_task.shape)}")
    for name, ids in (("pos_task", pos_task), ("neg_task", neg_task)):
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer task ids, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= sim.shape[0]):
            raise ValueError(f"{name} has ids outside [0, {sim.shape[0]})")
    pos = pos_task.to(sim.device).long()
    neg = neg_task.to(sim.device).long()
    return 1.0 - sim[pos.unsqueeze(1), neg]

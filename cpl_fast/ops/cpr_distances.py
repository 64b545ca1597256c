"""Per-sample contrastive distances ``(L_pos, L_neg)`` of one feature layer."""
from __future__ import annotations

import torch

from cpl_fast.ops._dispatch import Backend, Dispatcher
from cpl_fast.ops._reference import cpr_distances_reference

DISPATCHER = Dispatcher(
    op="cpr_distances",
    backends={"reference": Backend("reference", cpr_distances_reference, available=lambda device: [])},
    priority={"cpu": ("reference",), "cuda": ("reference",)},
)


def cpr_distances(f_pos: torch.Tensor, f_gt: torch.Tensor, f_neg: torch.Tensor,
                  neg_weights: torch.Tensor | None = None, backend: str = "auto"):
    """``(l_pos, l_neg)``, each ``(B,)``; f_pos, f_gt ``(B, ...)``, f_neg ``(m, B, ...)``, neg_weights ``(B, m)``."""
    return DISPATCHER(f_pos, f_gt, f_neg, neg_weights, backend=backend, device=f_pos.device)

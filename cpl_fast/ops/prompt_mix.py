"""Sparse prompt mix: ``out[b] = sum_j weights[b, j] * bilinear(bank[indices[b, j]], size)``."""
from __future__ import annotations

import torch

from cpl_fast.ops._dispatch import Backend, Dispatcher
from cpl_fast.ops._reference import prompt_mix_reference

DISPATCHER = Dispatcher(
    op="prompt_mix",
    backends={"reference": Backend("reference", prompt_mix_reference, available=lambda device: [])},
    priority={"cpu": ("reference",), "cuda": ("reference",)},
)


def prompt_mix(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, size,
               backend: str = "auto") -> torch.Tensor:
    """Mix the ``k`` selected experts of each sample and resize to ``size = (H, W)``.

    bank ``(n, C, S, S')``, indices ``(B, k)`` int64, weights ``(B, k)`` -> ``(B, C, H, W)``.
    """
    return DISPATCHER(bank, indices, weights, tuple(size), backend=backend, device=bank.device)

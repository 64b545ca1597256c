"""Remedies against routing collapse in the sparse prompt module (``router:`` in the config).

A router that sends every sample to one expert leaves the other experts untrained and makes the
"sparse prompt" a single prompt. Two remedies from the mixture-of-experts literature:

* ``aux_loss`` (Switch Transformer / GShard): per prompt level ``n * sum_i f_i P_i``, with ``f_i``
  the fraction of selections that went to expert ``i`` in the batch (a constant) and ``P_i`` the
  mean router probability of ``i``; it is 1 for a uniform load and reaches ``n`` when one expert
  takes everything, and its gradient lowers the probability of the busy experts;
* ``bias`` (auxiliary-loss-free balancing, DeepSeek-V3): each level keeps a selection-only bias per
  expert (``SparsePromptModule.route_bias``); after every optimiser step, the bias of an expert
  that served more than its share of the batch goes down by ``rate``, the others' go up. No term
  enters the loss, and the gate weights are the router's own probabilities.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from cpl_fast.models import Routing


def load_balancing_loss(routing: Sequence[Routing], num_prompts: int) -> torch.Tensor:
    """Sum over levels of ``n * sum_i f_i P_i`` for positive routings that carry ``probs``."""
    total = None
    for level, r in enumerate(routing):
        if r.probs is None:
            raise ValueError(f"level {level}: the routing has no router probabilities for the balancing term")
        counts = torch.bincount(r.indices.flatten(), minlength=num_prompts).to(r.probs.dtype)
        fraction = (counts / counts.sum()).detach()
        term = num_prompts * (fraction * r.probs.mean(dim=0)).sum()
        total = term if total is None else total + term
    return total


@torch.no_grad()
def update_route_bias(model: nn.Module, routing: Sequence[Routing], rate: float,
                      distributed: bool = False) -> None:
    """Move every level's selection bias toward a balanced load (see the module docstring)."""
    modules = list(model.prompt_modules())
    if len(modules) != len(routing):
        raise ValueError(f"{len(routing)} routings for {len(modules)} prompt levels")
    for spm, r in zip(modules, routing):
        if spm.route_bias is None:
            raise ValueError("router.balance=bias needs a model built with route_bias=True")
        counts = torch.bincount(r.indices.flatten(), minlength=spm.num_prompts).to(spm.route_bias.dtype)
        if distributed:
            dist.all_reduce(counts)
        spm.route_bias += rate * torch.sign(counts.mean() - counts)

"""The CPL training step written the natural batched way: one pass per negative over the batch.

One batched forward for the positives, then for each of the ``m`` negatives one batched forward
with its forced routing; ``phi`` once per pass. The encoder still runs ``1 + m`` times (the fused
step shares it); loss and gradients equal the per-sample ``literal_cpl_step``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cpl_fast.losses.cpr import CPRLoss, cpl_loss
from cpl_fast.losses.negatives import NegativeSampler
from cpl_fast.models.spm import Routing
from cpl_fast.train.steps.inputs import (
    check_neg_weights,
    check_negatives,
    kept_negatives,
    unpack_batch,
    used_negatives,
)
from cpl_fast.train.steps.negative_grad import check_mode, negative_pass
from cpl_fast.train.steps.output import CPLStepOutput


def loop_cpl_step(model: nn.Module, batch: Sequence, features: nn.Module, cpr_loss: CPRLoss,
                  negative_sampler: NegativeSampler, m: int = 4, negatives: list[list[Routing]] | None = None,
                  generator: torch.Generator | None = None,
                  neg_weights: torch.Tensor | None = None, neg_grad: str = "all",
                  negatives_per_step: int | None = None) -> CPLStepOutput:
    """One CPL step, batched per negative. Same arguments and result as ``literal_cpl_step``."""
    check_mode(neg_grad)
    degraded, target, task_ids = unpack_batch(batch)
    size = degraded.shape[0]
    check_neg_weights(neg_weights, size, m)
    kept, neg_weights = kept_negatives(m, negatives_per_step, generator, neg_weights)

    restored, routing = model(degraded, return_routing=True)
    routing = list(routing)
    if negatives is None:
        negatives = negative_sampler(routing, m, task_ids=task_ids, generator=generator)
    check_negatives(negatives, m, len(routing), size)
    negatives = used_negatives(negatives, kept)

    pos_feats = features(restored)
    with torch.no_grad():
        gt_feats = features(target)
    with negative_pass(model, neg_grad):
        negative_images = [model(degraded, routing=list(negative)) for negative in negatives]
    per_negative = [features(image) for image in negative_images]
    neg_feats = [torch.stack([feats[layer] for feats in per_negative]) for layer in range(len(pos_feats))]
    terms = cpr_loss(pos_feats, gt_feats, neg_feats, neg_weights)

    l1 = (restored - target).abs().mean()
    return CPLStepOutput(loss=cpl_loss(restored, target, terms), l1=l1, cpr=terms.loss,
                         l_pos=terms.l_pos, l_neg=terms.l_neg,
                         restored=restored, routing=routing, negatives=negatives,
                         negative_images=torch.stack(negative_images).detach())

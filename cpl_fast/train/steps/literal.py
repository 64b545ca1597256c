"""The CPL training step exactly as Algorithm 1 of the paper writes it: one sample at a time.

For each sample: one forward for the positive ``I+``, one full forward per negative ``I-_t`` with
its forced routing, separate feature passes ``phi(I+)``, ``phi(I_gt)`` (no grad) and
``phi(I-_t)``, then ``L1 + CPR`` for that sample; the batch loss is the mean over samples. It runs
the network ``B (1 + m)`` times and is the slow, obviously right oracle the faster steps are
checked against. Negatives are drawn once for the whole batch from the positives' routings (a
sampler such as ``other_task`` looks across samples), so a first loop runs the positives and a
second loop the negatives.
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


def _row(routing: Routing, b: int) -> Routing:
    return Routing(routing.indices[b:b + 1], routing.weights[b:b + 1], None)


def _cat_routings(per_sample: list[list[Routing]]) -> list[Routing]:
    """Per-sample per-level routings -> per-level batched routings."""
    batched = []
    for level in range(len(per_sample[0])):
        rows = [routings[level] for routings in per_sample]
        probs = None if any(r.probs is None for r in rows) else torch.cat([r.probs for r in rows])
        indices, weights = torch.cat([r.indices for r in rows]), torch.cat([r.weights for r in rows])
        batched.append(Routing(indices, weights, probs))
    return batched


def literal_cpl_step(model: nn.Module, batch: Sequence, features: nn.Module, cpr_loss: CPRLoss,
                     negative_sampler: NegativeSampler, m: int = 4,
                     negatives: list[list[Routing]] | None = None, generator: torch.Generator | None = None,
                     neg_weights: torch.Tensor | None = None, neg_grad: str = "all",
                     negatives_per_step: int | None = None) -> CPLStepOutput:
    """One CPL step, per sample and per negative (Algorithm 1). Does not call ``backward``.

    ``batch``: ``(degraded, target, task_ids or None)``. ``negatives``: ``m`` per-level forced
    routings covering the batch (drawn with ``negative_sampler(..., generator=generator)`` when None).
    ``neg_weights``: optional ``(B, m)`` weights on the negative term (see ``CPRLoss``).
    ``neg_grad``: which parameters the negatives' gradient reaches (``cpl_fast.train.steps.negative_grad``).
    ``negatives_per_step``: use only that many of the ``m`` negatives, drawn uniformly with ``generator``
    before anything else (``cpl_fast.train.steps.inputs.kept_negatives``); the result's ``negatives``
    are those used. None: all ``m``, as Algorithm 1.
    """
    check_mode(neg_grad)
    degraded, target, task_ids = unpack_batch(batch)
    size = degraded.shape[0]
    check_neg_weights(neg_weights, size, m)
    kept, neg_weights = kept_negatives(m, negatives_per_step, generator, neg_weights)

    restored_rows, routing_rows = [], []
    for b in range(size):
        restored_b, routing_b = model(degraded[b:b + 1], return_routing=True)
        restored_rows.append(restored_b)
        routing_rows.append(list(routing_b))
    routing = _cat_routings(routing_rows)
    if negatives is None:
        negatives = negative_sampler(routing, m, task_ids=task_ids, generator=generator)
    check_negatives(negatives, m, len(routing), size)
    negatives = used_negatives(negatives, kept)

    loss_rows, l1_rows, cpr_rows, l_pos_rows, l_neg_rows, negative_rows = [], [], [], [], [], []
    for b in range(size):
        x_b, target_b, restored_b = degraded[b:b + 1], target[b:b + 1], restored_rows[b]
        with negative_pass(model, neg_grad):
            negative_images = [model(x_b, routing=[_row(r, b) for r in negative]) for negative in negatives]
        negative_rows.append(torch.stack(negative_images).detach())
        pos_feats = features(restored_b)
        with torch.no_grad():
            gt_feats = features(target_b)
        per_negative = [features(image) for image in negative_images]
        neg_feats = [torch.stack([feats[layer] for feats in per_negative]) for layer in range(len(pos_feats))]
        weights_b = None if neg_weights is None else neg_weights[b:b + 1]
        terms = cpr_loss(pos_feats, gt_feats, neg_feats, weights_b)
        loss_rows.append(cpl_loss(restored_b, target_b, terms))
        l1_rows.append((restored_b - target_b).abs().mean())
        cpr_rows.append(terms.loss)
        l_pos_rows.append(terms.l_pos)
        l_neg_rows.append(terms.l_neg)

    # Every sample has the same number of pixels, so the mean of per-sample means is the batch mean.
    l1 = torch.stack(l1_rows).mean()
    cpr = torch.stack(cpr_rows).mean()
    return CPLStepOutput(loss=torch.stack(loss_rows).mean(), l1=l1, cpr=cpr, l_pos=torch.cat(l_pos_rows),
                         l_neg=torch.cat(l_neg_rows), restored=torch.cat(restored_rows), routing=routing,
                         negatives=negatives, negative_images=torch.cat(negative_rows, dim=1))

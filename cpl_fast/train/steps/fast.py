"""The CPL training step with a shared encoder: one encode, one decode over ``B (1 + m)`` rows.

In a prompted backbone every prompt comes after a prompt-free prefix (``model.encode``), so the
positive and its ``m`` negatives share that prefix exactly. This step encodes the batch once,
repeats the encoder state to ``B (1 + m)`` rows ordered ``[positives, negative 1, ..., negative m]``
(each block ``B`` rows) and decodes them in one pass: positive rows with their own routing,
negative rows with their forced routing. ``phi`` runs once on all restorations, and per feature
layer ``cpl_fast.ops.cpr_distances`` reads ``phi(I+)`` once for the ground truth and every
negative. Autograd sums the encoder's gradients over all rows, so loss and gradients equal
``literal_cpl_step`` with the same negatives (to float rounding); the encoder runs once instead of
``1 + m`` times.

Negatives are forced routings derived from the positive's routing. The routing of prompt level
``l + 1`` depends on the decoder's features after level ``l``, so when the step draws the
negatives itself they are drawn level by level inside the decoder pass: each level's routing entry
is a callable that receives the router's own choice for all rows, takes the positive rows' part,
and asks the sampler's ``sample_level`` for the ``m`` negatives of that level. That needs a model
whose prompt modules take callable routing entries (``accepts_routing_callables``, e.g.
``SparsePromptIR``) and a sampler that ``draws_by_level`` (``MismatchedExperts``). Otherwise (any
``EncodeDecodeModel``, any sampler) the positives are decoded first, the negatives drawn with the
sampler's full call, and the negatives decoded in a second pass: the same rows and the same result.
The second pass is also taken whenever ``neg_grad`` is not ``all``: the negatives are then decoded
inside ``negative_pass`` (from a detached encoder state where the mode keeps the shared network out).

``negatives_per_step=r`` (``r < m``) decodes only ``r`` of the ``m`` negatives, as every CPL step
can (``cpl_fast.train.steps.inputs.kept_negatives``: what that estimates, and for which forms it is
unbiased).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from cpl_fast.losses.cpr import CPRLoss, cpl_loss
from cpl_fast.losses.negatives import NegativeSampler
from cpl_fast.models.protocol import map_state
from cpl_fast.models.spm import Routing
from cpl_fast.train.steps.inputs import (
    check_neg_weights,
    check_negatives,
    kept_negatives,
    unpack_batch,
    used_negatives,
)
from cpl_fast.train.steps.negative_grad import check_mode, detaches_shared_state, negative_pass
from cpl_fast.train.steps.output import CPLStepOutput


def _chunks(m: int, neg_chunk: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of negatives decoded together."""
    if neg_chunk is None:
        return [(0, m)]
    if not isinstance(neg_chunk, int) or isinstance(neg_chunk, bool) or neg_chunk < 1:
        raise ValueError(f"neg_chunk must be None or a positive int, got {neg_chunk!r}")
    return [(start, min(start + neg_chunk, m)) for start in range(0, m, neg_chunk)]


def _repeat_rows(state, copies: int):
    """The encoder state with its batch repeated ``copies`` times, block after block."""
    if copies == 1:
        return state
    return map_state(lambda t: t.repeat(copies, *([1] * (t.dim() - 1))), state)


def _cat_rows(routings: Sequence[Routing]) -> Routing:
    """Routings of consecutive row blocks -> one routing (probs dropped: the router recomputes them)."""
    if len(routings) == 1:
        return Routing(routings[0].indices, routings[0].weights, None)
    return Routing(torch.cat([r.indices for r in routings]), torch.cat([r.weights for r in routings]), None)


def _first_rows(routing: Routing, rows: int) -> Routing:
    probs = None if routing.probs is None else routing.probs[:rows]
    return Routing(routing.indices[:rows], routing.weights[:rows], probs)


def fast_cpl_step(model: nn.Module, batch: Sequence, features: nn.Module, cpr_loss: CPRLoss,
                  negative_sampler: NegativeSampler, m: int = 4, negatives: list[list[Routing]] | None = None,
                  generator: torch.Generator | None = None, neg_chunk: int | None = None,
                  neg_weights: torch.Tensor | None = None, neg_grad: str = "all",
                  negatives_per_step: int | None = None) -> CPLStepOutput:
    """One CPL step with the encoder shared by the positive and its negatives. Does not call ``backward``.

    Same arguments and result as ``literal_cpl_step``; ``negatives`` drawn with the same
    ``generator`` seed are the same. ``neg_chunk``: decode (and run ``phi`` on) at most that many
    negatives per pass, to bound the size of one pass; same result. ``neg_grad``: see
    ``cpl_fast.train.steps.negative_grad``.

    ``negatives_per_step``: decode only that many (``r``) of the ``m`` negatives, drawn uniformly
    without replacement with ``generator`` before anything else (``inputs.kept_negatives``: the
    ``difference`` form's expected loss and gradient equal the full step's; the convex forms'
    expected loss is at least the full step's). ``negatives`` and ``neg_weights`` still describe all
    ``m``; the result's ``negatives``, ``negative_images`` and ``l_neg`` are those of the ``r``
    decoded ones. None or ``m``: the full step.
    """
    check_mode(neg_grad)
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"the number of negatives m must be a positive int, got {m!r}")
    degraded, target, task_ids = unpack_batch(batch)
    size = degraded.shape[0]
    check_neg_weights(neg_weights, size, m)
    kept, neg_weights = kept_negatives(m, negatives_per_step, generator, neg_weights)   # the slots decoded
    chunks = _chunks(len(kept), neg_chunk)
    levels = model.num_prompt_levels
    one_pass = getattr(model, "accepts_routing_callables", False) and neg_grad == "all"
    if negatives is not None:
        check_negatives(negatives, m, levels, size)
    elif one_pass and not negative_sampler.draws_by_level:
        one_pass = False

    state = model.encode(degraded)
    restored: torch.Tensor | None = None
    routing: list[Routing] = []
    if not one_pass:
        restored, used = model.decode(state, return_routing=True)
        routing = list(used)
        if negatives is None:
            negatives = negative_sampler(routing, m, task_ids=task_ids, generator=generator)
            check_negatives(negatives, m, levels, size)

    # drawn[t][level]: filled level by level during the first pass when the step samples itself.
    drawn: list[list[Routing]] = negatives if negatives is not None else [[None] * levels for _ in range(m)]
    routing_slots: list[Routing | None] = [None] * levels

    def with_positives(level: int, start: int, stop: int):
        """Level entry of the pass that holds the positive rows: their own routing, then the negatives'
        of slots ``kept[start:stop]`` (all ``m`` are drawn, so the draws do not depend on ``kept``)."""
        def entry(own: Routing) -> Routing:
            positive = _first_rows(own, size)
            routing_slots[level] = positive
            if negatives is None:
                per_negative = negative_sampler.sample_level(level, positive, m, task_ids=task_ids,
                                                    generator=generator)
                for t in range(m):
                    drawn[t][level] = per_negative[t]
            return _cat_rows([positive] + [drawn[t][level] for t in kept[start:stop]])
        return entry

    with torch.no_grad():
        gt_feats = features(target)
    pos_feats: list[torch.Tensor] = []
    if neg_grad == "none":
        pos_feats = features(restored)       # the negatives' features below need no graph
    neg_state = map_state(torch.Tensor.detach, state) if detaches_shared_state(neg_grad) else state
    neg_parts: list[list[torch.Tensor]] = []
    neg_images: list[torch.Tensor] = []
    for start, stop in chunks:
        count = stop - start
        decode_positives = restored is None
        copies = count + (1 if decode_positives else 0)
        if decode_positives:
            entries = [with_positives(level, start, stop) for level in range(levels)]
        else:
            entries = [_cat_rows([drawn[t][level] for t in kept[start:stop]]) for level in range(levels)]
        if decode_positives:
            images = model.decode(_repeat_rows(state, copies), entries)
            restored = images[:size]
            routing = list(routing_slots)
            neg_images.append(images[size:].detach())
        else:
            with negative_pass(model, neg_grad):
                images = model.decode(_repeat_rows(neg_state, copies), entries)
            neg_images.append(images.detach())
            if not pos_feats:
                # phi still sees positives and negatives in one batch
                images = torch.cat([restored, images])
        with negative_pass(model, neg_grad) if neg_grad == "none" else contextlib.nullcontext():
            feats = features(images)
        if not pos_feats:
            pos_feats = [f[:size] for f in feats]
            feats = [f[size:] for f in feats]
        neg_parts.append([f.view(count, size, *f.shape[1:]) for f in feats])

    neg_feats = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*neg_parts)]
    terms = cpr_loss(pos_feats, gt_feats, neg_feats, neg_weights)
    l1 = (restored - target).abs().mean()
    used = used_negatives(drawn, kept)
    return CPLStepOutput(loss=cpl_loss(restored, target, terms), l1=l1, cpr=terms.loss,
                         l_pos=terms.l_pos, l_neg=terms.l_neg,
                         restored=restored, routing=routing, negatives=used,
                         negative_images=torch.cat(neg_images).view(len(kept), size, *restored.shape[1:]))

"""Contrastive prompt regularisation (CPR) and the full CPL objective.

Per feature layer ``l`` (weight ``lambda_l``), ``cpl_fast.ops.cpr_distances`` gives per-sample
``L_pos_l[b] = mean (phi_l(I+_b) - phi_l(I_gt_b))^2`` and
``L_neg_l[b] = (1/m) sum_t w[b, t] mean (phi_l(I-_{t,b}) - phi_l(I+_b))^2``. Then, per sample:

* ``difference`` (the paper): ``reg_b = sum_l lambda_l (L_pos_l[b] - L_neg_l[b])``;
* ``ratio`` (bounded below by 0, the contrastive-regularisation form):
  ``reg_b = sum_l lambda_l L_pos_l[b] / (L_neg_l[b] + eps)``;

and ``loss = alpha * mean_b reg_b``. The CPL objective adds the L1 reconstruction term.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from cpl_fast.ops import cpr_distances

# The contrastive-regularisation convention for VGG19's relu1_1 ... relu5_1: deeper layers weigh more.
VGG19_LAYER_WEIGHTS: tuple[float, ...] = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
CPR_FORMS = ("difference", "ratio")


class CPRTerms(NamedTuple):
    """CPR's outputs: ``loss`` (scalar, alpha included), and for logging ``l_pos``, ``l_neg``
    ``(B,)``, each ``sum_l lambda_l L_*_l``."""

    loss: torch.Tensor
    l_pos: torch.Tensor
    l_neg: torch.Tensor


def default_layer_weights(num_layers: int) -> tuple[float, ...]:
    """``1/32, 1/16, 1/8, 1/4, 1`` for five layers (VGG19's taps), all ones for any other count."""
    return VGG19_LAYER_WEIGHTS if num_layers == len(VGG19_LAYER_WEIGHTS) else (1.0,) * num_layers


class CPRLoss(nn.Module):
    """Contrastive prompt regularisation over a list of feature layers.

    ``layer_weights=None`` picks ``default_layer_weights(num_layers)`` at call time; an explicit
    sequence must have one weight per layer. ``eps`` only enters the ``ratio`` form.
    """

    def __init__(self, alpha: float = 0.01, form: str = "difference",
                 layer_weights: Sequence[float] | None = None, eps: float = 1e-7) -> None:
        super().__init__()
        if form not in CPR_FORMS:
            raise ValueError(f"unknown CPR form '{form}'; choose one of {CPR_FORMS}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.alpha = float(alpha)
        self.form = form
        self.layer_weights = None if layer_weights is None else tuple(float(w) for w in layer_weights)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, form={self.form!r}, layer_weights={self.layer_weights}, eps={self.eps}"

    def weights_for(self, num_layers: int) -> tuple[float, ...]:
        """The layer weights used with ``num_layers`` layers (error if they do not match)."""
        if self.layer_weights is None:
            return default_layer_weights(num_layers)
        if len(self.layer_weights) != num_layers:
            raise ValueError(f"CPRLoss has {len(self.layer_weights)} layer weights but got {num_layers} "
                             f"feature layers")
        return self.layer_weights

    def forward(self, pos_feats: Sequence[torch.Tensor], gt_feats: Sequence[torch.Tensor],
                neg_feats: Sequence[torch.Tensor], neg_weights: torch.Tensor | None = None) -> CPRTerms:
        """``pos_feats``, ``gt_feats``: per layer ``(B, ...)``; ``neg_feats``: per layer ``(m, B, ...)``;
        ``neg_weights``: ``(B, m)`` per-pair weights on the negative term, or None (all ones)."""
        num_layers = len(pos_feats)
        if num_layers == 0:
            raise ValueError("CPRLoss needs at least one feature layer")
        if len(gt_feats) != num_layers or len(neg_feats) != num_layers:
            raise ValueError(f"layer counts differ: {num_layers} positive, {len(gt_feats)} ground-truth, "
                             f"{len(neg_feats)} negative feature maps")
        weights = self.weights_for(num_layers)
        batch = pos_feats[0].shape[0]
        for layer, (pos, gt, neg) in enumerate(zip(pos_feats, gt_feats, neg_feats)):
            if gt.shape != pos.shape or neg.dim() != pos.dim() + 1 or neg.shape[1:] != pos.shape:
                raise ValueError(f"layer {layer}: expected gt {tuple(pos.shape)} and negatives (m, "
                                 f"{', '.join(map(str, pos.shape))}), got gt {tuple(gt.shape)} and "
                                 f"negatives {tuple(neg.shape)}")
            if pos.shape[0] != batch or neg.shape[0] != neg_feats[0].shape[0]:
                raise ValueError(f"layer {layer}: batch or negative count differs from layer 0")
        m = neg_feats[0].shape[0]
        if neg_weights is not None and tuple(neg_weights.shape) != (batch, m):
            raise ValueError(f"neg_weights must be (B, m) = ({batch}, {m}), got {tuple(neg_weights.shape)}")

        l_pos = l_neg = reg = None
        for weight, pos, gt, neg in zip(weights, pos_feats, gt_feats, neg_feats):
            pos_l, neg_l = cpr_distances(pos, gt, neg, neg_weights)
            if self.form == "difference":
                reg_l = weight * (pos_l - neg_l)
            else:
                reg_l = weight * pos_l / (neg_l + self.eps)
            l_pos = weight * pos_l if l_pos is None else l_pos + weight * pos_l
            l_neg = weight * neg_l if l_neg is None else l_neg + weight * neg_l
            reg = reg_l if reg is None else reg + reg_l
        return CPRTerms(self.alpha * reg.mean(), l_pos, l_neg)


def cpl_loss(restored: torch.Tensor, target: torch.Tensor, terms: CPRTerms) -> torch.Tensor:
    """The CPL objective: ``mean |restored - target| + terms.loss`` (CPR already scaled by alpha)."""
    if restored.shape != target.shape:
        raise ValueError(f"restored {tuple(restored.shape)} and target {tuple(target.shape)} differ in shape")
    return (restored - target).abs().mean() + terms.loss

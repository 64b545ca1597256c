"""Contrastive prompt regularisation (CPR) and the full CPL objective.

Per feature layer ``l`` (weight ``lambda_l``) the per-sample distances are

* ``L_pos_l[b] = D(phi_l(I+_b), phi_l(I_gt_b))``,
* ``L_neg_l[b] = (1/m) sum_t w[b, t] D(phi_l(I-_{t,b}), phi_l(I+_b))``,

with ``D`` the mean squared difference (``distance="l2"``, the paper; fused in
``cpl_fast.ops.cpr_distances``) or the mean absolute difference (``distance="l1"``, the
contrastive-regularisation literature). ``L_pos[b] = sum_l lambda_l L_pos_l[b]``, likewise ``L_neg``.
Then, per sample, the regulariser ``reg_b`` is

* ``difference`` (the paper): ``L_pos - L_neg``; unbounded below, so a model can lower it without
  limit by making negatives differ from the positive;
* ``ratio``: ``sum_l lambda_l L_pos_l / (L_neg_l + eps)``, bounded below by 0;
* ``hinge``: ``L_pos + relu(margin * L_pos - L_neg)``: negatives are pushed only until they are
  ``margin`` times as far from the positive as the positive is from the ground truth;
* ``logistic``: ``tau * softplus((L_pos - L_neg) / tau)``, the preference-style form: close to the
  difference while ``L_neg`` is small, flat once ``L_neg`` exceeds ``L_pos`` by a few ``tau``
  (times ``tau`` so that it has the difference form's units and ``alpha`` means the same);

and ``loss = alpha * mean_b reg_b``. ``anchor_grad=False`` computes ``L_neg`` from a detached
``phi(I+)``: the negatives' term then moves the negatives (and whatever made them), not the positive.
The CPL objective adds the L1 reconstruction term.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cpl_fast.ops import cpr_distances

# The contrastive-regularisation convention for VGG19's relu1_1 ... relu5_1: deeper layers weigh more.
VGG19_LAYER_WEIGHTS: tuple[float, ...] = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
CPR_FORMS = ("difference", "ratio", "hinge", "logistic")
CPR_DISTANCES = ("l2", "l1")


class CPRTerms(NamedTuple):
    """CPR's outputs: ``loss`` (scalar, alpha included), and for logging ``l_pos``, ``l_neg``
    ``(B,)``, each ``sum_l lambda_l L_*_l``."""

    loss: torch.Tensor
    l_pos: torch.Tensor
    l_neg: torch.Tensor


def default_layer_weights(num_layers: int) -> tuple[float, ...]:
    """``1/32, 1/16, 1/8, 1/4, 1`` for five layers (VGG19's taps), all ones for any other count."""
    return VGG19_LAYER_WEIGHTS if num_layers == len(VGG19_LAYER_WEIGHTS) else (1.0,) * num_layers


def _positive_number(name: str, value: float | None, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"CPRLoss: {name} must be a finite positive number, got {value!r}")
    return float(value)


def l1_distances(f_pos: torch.Tensor, f_gt: torch.Tensor, f_neg: torch.Tensor,
                 neg_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cpr_distances`` with the mean absolute difference in place of the mean squared one."""
    batch, m = f_pos.shape[0], f_neg.shape[0]
    l_pos = (f_pos - f_gt).abs().reshape(batch, -1).mean(dim=1)
    per_negative = (f_neg - f_pos.unsqueeze(0)).abs().reshape(m, batch, -1).mean(dim=2)      # (m, B)
    if neg_weights is not None:
        per_negative = per_negative * neg_weights.detach().t().to(per_negative.dtype)
    return l_pos, per_negative.sum(dim=0) / m


class CPRLoss(nn.Module):
    """Contrastive prompt regularisation over a list of feature layers.

    ``layer_weights=None`` picks ``default_layer_weights(num_layers)`` at call time; an explicit
    sequence must have one weight per layer. ``eps`` only enters the ``ratio`` form, ``margin`` the
    ``hinge`` form and ``tau`` the ``logistic`` form (it is in the units of ``L_pos``: the trainer
    sets it from the first batch when not given; a logistic loss without ``tau`` cannot be called).
    ``alpha`` is an attribute the trainer may change between steps (calibration, warm-up).
    """

    def __init__(self, alpha: float = 0.01, form: str = "difference",
                 layer_weights: Sequence[float] | None = None, eps: float = 1e-7, distance: str = "l2",
                 anchor_grad: bool = True, margin: float = 1.0, tau: float | None = None) -> None:
        super().__init__()
        if form not in CPR_FORMS:
            raise ValueError(f"unknown CPR form '{form}'; choose one of {CPR_FORMS}")
        if distance not in CPR_DISTANCES:
            raise ValueError(f"unknown CPR distance '{distance}'; choose one of {CPR_DISTANCES}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not isinstance(anchor_grad, bool):
            raise ValueError(f"CPRLoss: anchor_grad must be True or False, got {anchor_grad!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
            raise ValueError(f"CPRLoss: alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.form = form
        self.distance = distance
        self.anchor_grad = anchor_grad
        self.margin = _positive_number("margin", margin)
        self.tau = _positive_number("tau", tau, optional=True)
        self.layer_weights = None if layer_weights is None else tuple(float(w) for w in layer_weights)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, form={self.form!r}, distance={self.distance!r}, "
                f"anchor_grad={self.anchor_grad}, margin={self.margin}, tau={self.tau}, "
                f"layer_weights={self.layer_weights}, eps={self.eps}")

    def weights_for(self, num_layers: int) -> tuple[float, ...]:
        """The layer weights used with ``num_layers`` layers (error if they do not match)."""
        if self.layer_weights is None:
            return default_layer_weights(num_layers)
        if len(self.layer_weights) != num_layers:
            raise ValueError(f"CPRLoss has {len(self.layer_weights)} layer weights but got {num_layers} "
                             f"feature layers")
        return self.layer_weights

    def _distances(self, pos: torch.Tensor, gt: torch.Tensor, neg: torch.Tensor,
                   neg_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        distances = cpr_distances if self.distance == "l2" else l1_distances
        if self.anchor_grad:
            return distances(pos, gt, neg, neg_weights)
        # Two calls: L_pos needs phi(I+)'s gradient, L_neg must not pass any to it.
        pos_l, _ = distances(pos, gt, neg.detach(), neg_weights)
        _, neg_l = distances(pos.detach(), gt, neg, neg_weights)
        return pos_l, neg_l

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
        if self.form == "logistic" and self.tau is None:
            raise ValueError("CPRLoss(form='logistic') needs tau (in the units of L_pos): pass tau=, or set "
                             "cpr.tau, or let the trainer calibrate it (cpr.tau: null)")
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

        l_pos = l_neg = ratio = None
        for weight, pos, gt, neg in zip(weights, pos_feats, gt_feats, neg_feats):
            pos_l, neg_l = self._distances(pos, gt, neg, neg_weights)
            if self.form == "ratio":
                ratio_l = weight * pos_l / (neg_l + self.eps)
                ratio = ratio_l if ratio is None else ratio + ratio_l
            l_pos = weight * pos_l if l_pos is None else l_pos + weight * pos_l
            l_neg = weight * neg_l if l_neg is None else l_neg + weight * neg_l
        if self.form == "difference":
            reg = l_pos - l_neg
        elif self.form == "ratio":
            reg = ratio
        elif self.form == "hinge":
            reg = l_pos + F.relu(self.margin * l_pos - l_neg)
        else:
            reg = self.tau * F.softplus((l_pos - l_neg) / self.tau)
        return CPRTerms(self.alpha * reg.mean(), l_pos, l_neg)


def cpl_loss(restored: torch.Tensor, target: torch.Tensor, terms: CPRTerms) -> torch.Tensor:
    """The CPL objective: ``mean |restored - target| + terms.loss`` (CPR already scaled by alpha)."""
    if restored.shape != target.shape:
        raise ValueError(f"restored {tuple(restored.shape)} and target {tuple(target.shape)} differ in shape")
    return (restored - target).abs().mean() + terms.loss

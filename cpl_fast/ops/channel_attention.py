"""The attention core of Restormer's MDTA block: ``softmax(t * q^ k^T) v`` across channels, where ``q^`` and
``k^`` are ``q`` and ``k`` normalised along the pixels (``F.normalize(x, dim=-1)``, eps 1e-12).

For ``q, k, v (B, heads, d, N)`` (``d`` channels a head, ``N`` pixels) and ``temperature (heads, 1, 1)``
the published composite lets autograd differentiate ``F.normalize``, the product with ``k^T``, the scale
and the softmax. Its backward reaches ``k`` through the transpose, so the gradient of ``k^`` arrives as
a transposed ``(N, d)`` view and the normalisation's backward runs over it with strided reads; at the
32x32 level of the ``cpl`` model those element-wise ops ran at a tenth of their contiguous speed. Here
the backward is written out with every operand ``(.., d, N)`` contiguous:

    S = q^ k^T,  A = softmax(t S),  out = A v
    dv = A^T g,  dA = g v^T,  dL = A * (dA - rowsum(dA * A)),  dt = sum(dL * S),  dS = t dL
    dq^ = dS k^,  dk^ = dS^T q^,  dx = (dx^ - x^ rowsum(dx^ * x^)) / max(|x|, eps)

(where ``|x| < eps`` the normalisation divides by the constant eps and ``dx = dx^ / eps``, as autograd
of ``F.normalize`` gives). The same function as the composite, to float rounding
(tests/test_channel_attention.py; the model test compares whole models in float64 to 1e-10).
``backend="reference"`` or ``CPL_FAST_BACKEND=reference`` runs the published composite; the other
backend names do not apply (this op has no kernel of its own).
"""
from __future__ import annotations

import torch

from cpl_fast.ops._dispatch import requested_backend
from cpl_fast.ops._reference import NORMALIZE_EPS, channel_attention_reference


def _validate(q, k, v, temperature) -> None:
    tensors = (("q", q), ("k", k), ("v", v), ("temperature", temperature))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"channel_attention: {name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"channel_attention: q must be (B, heads, d, N), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"channel_attention: {name} must have q's shape {tuple(q.shape)}, got "
                             f"{tuple(t.shape)}")
    heads = q.shape[1]
    if tuple(temperature.shape) != (heads, 1, 1):
        raise ValueError(f"channel_attention: temperature must be ({heads}, 1, 1) for {heads} heads, got "
                         f"{tuple(temperature.shape)}")
    autocast = torch.is_autocast_enabled(q.device.type)
    for name, t in tensors[1:]:
        if t.device != q.device:
            raise ValueError(f"channel_attention: {name} is on {t.device}, q on {q.device}")
        if t.dtype != q.dtype and not autocast:
            raise ValueError(f"channel_attention: {name} dtype {t.dtype} differs from q dtype {q.dtype}")


def _normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORMALIZE_EPS)
    return x / norm, norm


def _normalise_backward(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    # (grad - unit <grad, unit>) / norm in three passes over the rows (vecdot, addcmul, div_), none of
    # them a full-size temporary. Below eps the divisor is the constant eps: no projection term.
    dot = torch.linalg.vecdot(grad, unit).unsqueeze(-1).masked_fill_(norm <= NORMALIZE_EPS, 0.0)
    return torch.addcmul(grad, unit, dot, value=-1.0).div_(norm)


class _ChannelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, temperature):
        q_unit, q_norm = _normalise(q)
        k_unit, k_norm = _normalise(k)
        scores = q_unit @ k_unit.transpose(-2, -1)
        attn = (scores * temperature).softmax(dim=-1)
        ctx.save_for_backward(q_unit, q_norm, k_unit, k_norm, v, temperature, scores, attn)
        return attn @ v

    @staticmethod
    def backward(ctx, grad):
        q_unit, q_norm, k_unit, k_norm, v, temperature, scores, attn = ctx.saved_tensors
        grad = grad.contiguous()
        grad_v = attn.transpose(-2, -1) @ grad
        grad_attn = grad @ v.transpose(-2, -1)
        grad_logits = attn * (grad_attn - (grad_attn * attn).sum(-1, keepdim=True))
        grad_temperature = (grad_logits * scores).sum(dim=(0, 2, 3)).view(temperature.shape)
        grad_scores = grad_logits * temperature
        grad_q = _normalise_backward(grad_scores @ k_unit, q_unit, q_norm)
        grad_k = _normalise_backward(grad_scores.transpose(-2, -1) @ q_unit, k_unit, k_norm)
        return grad_q, grad_k, grad_v, grad_temperature


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                      backend: str = "auto") -> torch.Tensor:
    """``softmax(temperature * normalize(q) @ normalize(k)^T) @ v`` for ``(B, heads, d, N)`` inputs, with
    the backward written in contiguous layouts (module docstring)."""
    _validate(q, k, v, temperature)
    # Under autocast the composite's ops each take autocast's dtype; a Function would see the inputs as given.
    if requested_backend(backend) == "reference" or torch.is_autocast_enabled(q.device.type):
        return channel_attention_reference(q, k, v, temperature)
    return _ChannelAttention.apply(q, k, v, temperature)

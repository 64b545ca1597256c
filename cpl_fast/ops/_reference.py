"""Plain-PyTorch oracles of cpl_fast's ops.

Tests, benchmarks and the ONNX export import these; every fast backend must agree with them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def routing_matrix(indices: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """The ``(B, n)`` matrix of kept routing weights: ``out[b, i] = sum_j weights[b, j] [indices[b, j] = i]``.

    Written as compare-and-sum rather than ``scatter_add`` (the same sum; duplicate indices add up)
    because ONNX writes ``scatter_add`` as ``ScatterElements(reduction="add")``, which TensorRT's
    parser rejects, while this exports as ``Equal``, ``Where`` and ``ReduceSum``. It costs
    ``B x k x n`` booleans, nothing next to the maps it weights.
    """
    hit = indices.unsqueeze(-1) == torch.arange(n, device=indices.device)         # (B, k, n)
    return torch.where(hit, weights.unsqueeze(-1), weights.new_zeros(())).sum(1)


def prompt_mix_reference(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                         size: tuple[int, int]) -> torch.Tensor:
    """``out[b] = sum_j weights[b, j] * bilinear(bank[indices[b, j]], size)``.

    Mixes the selected experts at the bank's resolution, then resizes once (bilinear resize is
    linear, so mixing before or after it is the same function). The mix is one ``(B, n)`` matrix
    (``routing_matrix``: the kept weights, duplicates summed) times the flattened bank, so no
    ``B x k x C x S x S'`` gather is allocated, whatever ``k`` is (the dense PromptIR has ``k = n``).
    bank ``(n, C, S, S')``, indices ``(B, k)`` int64, weights ``(B, k)`` -> ``(B, C, H, W)``.
    """
    n, channels, height, width = bank.shape
    mix = routing_matrix(indices, weights.to(bank.dtype), n)
    mixed = (mix @ bank.reshape(n, -1)).view(-1, channels, height, width)
    return F.interpolate(mixed, size=tuple(size), mode="bilinear", align_corners=False)


def prompt_mix_materialized(bank: torch.Tensor, probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The published implementations' dense prompt: repeat the bank per sample, scale, sum, resize.

    Kept as the baseline the benchmarks compare against (it allocates ``B x n x C x S x S``).
    """
    batch = probs.shape[0]
    scaled = probs[:, :, None, None, None] * bank.unsqueeze(0).repeat(batch, 1, 1, 1, 1)
    return F.interpolate(scaled.sum(1), size=tuple(size), mode="bilinear", align_corners=False)


def cpr_distances_reference(f_pos: torch.Tensor, f_gt: torch.Tensor, f_neg: torch.Tensor,
                            neg_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample contrastive distances of one feature layer.

    ``l_pos[b] = mean((f_pos[b] - f_gt[b])**2)`` and
    ``l_neg[b] = (1/m) sum_t w[b, t] * mean((f_neg[t, b] - f_pos[b])**2)`` with ``w = 1`` when
    ``neg_weights`` is None. Shapes: f_pos, f_gt ``(B, ...)``; f_neg ``(m, B, ...)``;
    neg_weights ``(B, m)``. Returns ``(l_pos, l_neg)``, each ``(B,)``.
    """
    batch = f_pos.shape[0]
    m = f_neg.shape[0]
    l_pos = (f_pos - f_gt).pow(2).reshape(batch, -1).mean(1)
    d_neg = (f_neg - f_pos.unsqueeze(0)).pow(2).reshape(m, batch, -1).mean(2)     # (m, B)
    if neg_weights is not None:
        d_neg = d_neg * neg_weights.t().to(d_neg.dtype)
    return l_pos, d_neg.mean(0)


def channel_layernorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                eps: float = 1e-5) -> torch.Tensor:
    """Layer norm over the channels of every pixel of ``x (B, C, ...)``, as Restormer writes it.

    With ``bias``: ``(x - mu) / sqrt(var + eps) * weight + bias`` (``WithBias_LayerNorm``); without:
    ``x / sqrt(var + eps) * weight`` (``BiasFree_LayerNorm``: the mean is not subtracted from ``x``, the
    variance is the centred one). ``mu`` and ``var`` (biased) are over dim 1. The published code transposes
    to ``(B, HW, C)`` and back (``to_3d``/``to_4d``); reducing over dim 1 in place is the same function.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    if bias is None:
        return x / torch.sqrt(var + eps) * weight.view(shape)
    return (x - mu) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)


def gated_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """Restormer's feed-forward gate: ``gelu(x1) * x2`` for the two channel halves ``x1, x2`` of ``x``
    ``(B, 2C, ...)`` (exact, erf GELU)."""
    x1, x2 = x.chunk(2, dim=1)
    return F.gelu(x1) * x2


def depthwise_conv3x3_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Restormer's depthwise 3x3 convolution (``qkv_dwconv``, the FFN's ``dwconv``): stride 1, padding 1,
    no bias, one 3x3 filter per channel; ``x (B, C, H, W)``, ``weight (C, 1, 3, 3)``."""
    return F.conv2d(x, weight, padding=1, groups=x.shape[1])


def pointwise_conv_reference(x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The 1x1 convolution ``F.conv2d(x, weight, bias)`` with ``weight (O, C, 1, 1)``."""
    return F.conv2d(x, weight, bias)


# F.normalize's default eps: the norm is clamped to it before dividing.
NORMALIZE_EPS = 1e-12


def channel_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                temperature: torch.Tensor) -> torch.Tensor:
    """Restormer's MDTA core as published: ``softmax(t * normalize(q) @ normalize(k)^T) @ v`` along the
    pixels (the last dimension) of ``(B, heads, d, N)`` inputs."""
    q = F.normalize(q, dim=-1, eps=NORMALIZE_EPS)
    k = F.normalize(k, dim=-1, eps=NORMALIZE_EPS)
    return ((q @ k.transpose(-2, -1)) * temperature).softmax(dim=-1) @ v

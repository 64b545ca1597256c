"""Restormer building blocks, as PromptIR's (and CPL's) published code defines them.

The attribute names mirror the published modules so that their checkpoints load key for key
(``encoder_level1.0.norm1.body.weight``, ``...attn.qkv_dwconv.weight``, ``...ffn.project_in.weight``).
Every convolution is bias-free, as in the published ``bias=False`` configuration.

Fused ops. By default the blocks compute through cpl_fast's backbone ops: the channel layer norm of
``LayerNorm`` (:func:`cpl_fast.ops.channel_layernorm`: no transposes to and from ``(B, HW, C)``), the
feed-forward gate (:func:`cpl_fast.ops.gated_gelu`), the attention core of ``Attention``
(:func:`cpl_fast.ops.channel_attention`: its backward in contiguous layouts), every 1x1 convolution
(:class:`PointwiseConv2d`: a GEMM over the channels where PyTorch's CPU convolution takes its slow
path) and every 3x3 depthwise convolution (:class:`DepthwiseConv3x3`: cpl_fast's CPU kernels). Each
module's ``ops`` attribute (``"fused"`` or ``"reference"``; :func:`set_backbone_ops` sets it
on a whole model) chooses; ``"reference"`` is the published composite, line for line. Both are the same
function (tests/test_fused_model.py compares the whole model's outputs and gradients). While
``torch.export`` or TorchScript traces a model the blocks take the reference composites whatever ``ops``
says, so an exported graph holds standard operators only (the ONNX export relies on it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpl_fast.ops._reference import channel_attention_reference
from cpl_fast.ops.channel_attention import channel_attention
from cpl_fast.ops.channel_layernorm import channel_layernorm
from cpl_fast.ops.depthwise_conv import depthwise_conv3x3
from cpl_fast.ops.gated_gelu import gated_gelu
from cpl_fast.ops.pointwise_conv import pointwise_conv

BACKBONE_OPS = ("fused", "reference")


def _fused(module: nn.Module) -> bool:
    """Whether ``module`` computes through the fused ops now (never while a graph is exported or traced)."""
    if module.ops not in BACKBONE_OPS:
        raise ValueError(f"{type(module).__name__}.ops must be one of {BACKBONE_OPS}, got {module.ops!r}")
    return module.ops == "fused" and not torch.compiler.is_exporting() and not torch.jit.is_tracing()


def set_backbone_ops(model: nn.Module, ops: str) -> nn.Module:
    """Set ``ops`` (``"fused"`` or ``"reference"``) on every block of ``model`` that has a fused form."""
    if ops not in BACKBONE_OPS:
        raise ValueError(f"set_backbone_ops: ops must be one of {BACKBONE_OPS}, got {ops!r}")
    for module in model.modules():
        if isinstance(module, (LayerNorm, Attention, FeedForward, PointwiseConv2d, DepthwiseConv3x3)):
            module.ops = ops
    return model


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters, same state-dict keys) computed by
    :func:`cpl_fast.ops.pointwise_conv`.

    PyTorch's CPU convolution sends 1x1 kernels with a batch below 16 on one thread to its slow path; there
    the GEMM over the channels is the same maths, measured about as fast; elsewhere ``F.conv2d`` runs
    (bench/test_backbone_ops.py).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)
        self.ops = "fused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(self):
            return pointwise_conv(x, self.weight, self.bias)
        return super().forward(x)


class DepthwiseConv3x3(nn.Conv2d):
    """The blocks' 3x3 depthwise ``nn.Conv2d`` (padding 1, no bias; same parameters, same state-dict keys)
    computed by :func:`cpl_fast.ops.depthwise_conv3x3`, whose CPU kernels replace oneDNN's NCHW depthwise
    convolution (a quarter of a CPU training step before); on a GPU that op runs ``F.conv2d`` itself."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False)
        self.ops = "fused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(self):
            return depthwise_conv3x3(x, self.weight)
        return super().forward(x)


class WithBiasLayerNorm(nn.Module):
    """Layer norm over the last dimension with a learnt scale and shift (biased variance, eps 1e-5).

    ``fused = True`` computes the same function with ``F.layer_norm`` (the ONNX export sets it, so
    the graph holds one ``LayerNormalization`` node per norm instead of its arithmetic).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, eps=1e-5)
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class BiasFreeLayerNorm(nn.Module):
    """Restormer's bias-free layer norm over the last dimension: ``x / sqrt(var + 1e-5) * weight``.

    The variance is the centred (biased) one, but the mean is not subtracted from ``x``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.var(-1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + 1e-5) * self.weight


class LayerNorm(nn.Module):
    """Per-pixel layer norm over the channels of a ``(B, C, H, W)`` map.

    The norm itself lives in ``body`` so the parameters are named ``norm1.body.weight`` as in the
    published checkpoints. ``bias=False`` is Restormer's ``BiasFree`` variant. With ``ops="fused"`` the
    norm runs as :func:`cpl_fast.ops.channel_layernorm` on the NCHW map; the reference path (and an export,
    which sets the body's ``fused`` flag for one ``LayerNormalization`` node) transposes to ``(B, HW, C)``
    and back as the published code does.
    """

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.body = WithBiasLayerNorm(dim) if bias else BiasFreeLayerNorm(dim)
        self.ops = "fused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(self) and not getattr(self.body, "fused", False):
            return channel_layernorm(x, self.body.weight, getattr(self.body, "bias", None), eps=1e-5)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)                       # (B, HW, C)
        return self.body(tokens).transpose(1, 2).reshape(b, c, h, w)


class Attention(nn.Module):
    """Multi-Dconv head transposed attention (MDTA): attention across channels, not pixels.

    Its cost is linear in the number of pixels: the attention matrix is ``(C/heads)^2`` per head.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = PointwiseConv2d(dim, dim * 3)
        self.qkv_dwconv = DepthwiseConv3x3(dim * 3)
        self.project_out = PointwiseConv2d(dim, dim)
        self.ops = "fused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        attention = channel_attention if _fused(self) else channel_attention_reference
        return self.project_out(attention(q, k, v, self.temperature).reshape(b, c, h, w))


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN): ``project_out(gelu(x1) * x2)``.

    With ``ops="fused"`` the gate is :func:`cpl_fast.ops.gated_gelu` (one pass each way).
    """

    def __init__(self, dim: int, ffn_expansion_factor: float) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = PointwiseConv2d(dim, hidden * 2)
        self.dwconv = DepthwiseConv3x3(hidden * 2)
        self.project_out = PointwiseConv2d(hidden, dim)
        self.ops = "fused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dwconv(self.project_in(x))
        if _fused(self):
            return self.project_out(gated_gelu(hidden))
        x1, x2 = hidden.chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Pre-norm Restormer block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_expansion_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3x3 convolution from the image channels to the model width."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve the resolution, double the channels: conv ``n -> n/2`` then pixel-unshuffle by 2."""

    def __init__(self, n_feat: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels: conv ``n -> 2n`` then pixel-shuffle by 2."""

    def __init__(self, n_feat: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def transformer_stage(dim: int, num_heads: int, num_blocks: int,
                      ffn_expansion_factor: float) -> nn.Sequential:
    """``num_blocks`` Restormer blocks in a row (an encoder, decoder, latent or refinement stage)."""
    return nn.Sequential(*[TransformerBlock(dim, num_heads, ffn_expansion_factor) for _ in range(num_blocks)])

"""NAFNet with Sparse Prompt Modules: CPL on a CNN backbone (the paper's Table X).

NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022) is a U-Net of NAFBlocks:
no nonlinear activation, a SimpleGate (split the channels in two halves and multiply them) and a
simplified channel attention. Here each decoder level starts with a prompt, as in PromptIR: the
Sparse Prompt Module's prompt is concatenated to the features and fused back by a 1x1 convolution,
then the level upsamples, adds its skip and runs its blocks. Prompt levels are in application order,
deepest first, so everything before the first prompt (intro, encoder, middle blocks) is the
prompt-free ``encode``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from cpl_fast.models.protocol import check_image_batch
from cpl_fast.models.registry import PRESETS, register_model
from cpl_fast.models.spm import Routing, SparsePromptModule


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of each pixel of a ``(B, C, H, W)`` map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).square().mean(1, keepdim=True)
        y = (x - mean) / (var + self.eps).sqrt()
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """The product of the two channel halves: NAFNet's replacement for a nonlinear activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """Spatial mixing (1x1, 3x3 depthwise, SimpleGate, channel attention, 1x1) and a gated FFN.

    Each branch is added with a learned per-channel scale (``beta``, ``gamma``), zero at
    initialisation as in NAFNet, so a fresh block is the identity.
    """

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2) -> None:
        super().__init__()
        dw = channels * dw_expand
        ffn = channels * ffn_expand
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.sg = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv3 = nn.Conv2d(dw // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sg(self.conv2(self.conv1(self.norm1(x))))
        y = self.conv3(y * self.sca(y))
        x = x + self.beta * y
        y = self.conv5(self.sg(self.conv4(self.norm2(x))))
        return x + self.gamma * y


def _blocks(channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(NAFBlock(channels) for _ in range(count)))


class NAFNetState(NamedTuple):
    """The prompt-free part of the forward, batch first: what the decoder reads."""

    image: torch.Tensor                 # (B, C_in, H, W): the input, added back at the output
    skips: tuple[torch.Tensor, ...]     # encoder outputs, shallowest first
    latent: torch.Tensor                # the middle blocks' output


@register_model
class PromptNAFNet(nn.Module):
    """NAFNet whose decoder levels each start with a Sparse Prompt Module.

    ``enc_blocks[i]`` blocks at encoder level ``i`` (width ``width * 2**i``), a strided 2x2 conv
    down; ``middle_blocks`` at the bottom; per decoder level (deepest first) a prompt
    (``prompt_dims[l]`` channels, ``prompt_sizes[l]`` square) concatenated and fused by a 1x1 conv,
    a 1x1 conv + PixelShuffle up, the skip added, ``dec_blocks[l]`` blocks. ``top_k=None``: dense
    prompts (every expert weighted by its probability).
    """

    accepts_routing_callables = True

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, width: int = 32,
                 enc_blocks: Sequence[int] = (2, 2, 4, 8), middle_blocks: int = 12,
                 dec_blocks: Sequence[int] = (2, 2, 2, 2), num_prompts: int = 5, top_k: int | None = 1,
                 renormalize: bool = False, route_bias: bool = False, prompt_dims: Sequence[int] | None = None,
                 prompt_sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        levels = len(enc_blocks)
        if levels < 1 or len(dec_blocks) != levels:
            raise ValueError("PromptNAFNet: enc_blocks and dec_blocks need the same number (>= 1) of "
                             f"levels, got {tuple(enc_blocks)} and {tuple(dec_blocks)}")
        # Channels at each decoder level's input, deepest first.
        dec_channels = [width * 2 ** (levels - i) for i in range(levels)]
        prompt_dims = tuple(prompt_dims) if prompt_dims is not None else tuple(c // 4 for c in dec_channels)
        if prompt_sizes is None:
            prompt_sizes = tuple(8 * 2 ** i for i in range(levels))
        prompt_sizes = tuple(prompt_sizes)
        for name, value in (("prompt_dims", prompt_dims), ("prompt_sizes", prompt_sizes)):
            if len(value) != levels:
                raise ValueError(f"PromptNAFNet: {name} needs {levels} entries (one per decoder level), "
                                 f"got {value}")
        self.inp_channels = inp_channels
        self.num_prompts = num_prompts
        self.top_k = top_k
        self.num_prompt_levels = levels
        self.size_multiple = 2 ** levels

        self.intro = nn.Conv2d(inp_channels, width, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        channels = width
        for count in enc_blocks:
            self.encoders.append(_blocks(channels, count))
            self.downs.append(nn.Conv2d(channels, 2 * channels, 2, stride=2))
            channels *= 2
        self.middle = _blocks(channels, middle_blocks)
        self.prompts, self.fuses = nn.ModuleList(), nn.ModuleList()
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for level, count in enumerate(dec_blocks):
            self.prompts.append(SparsePromptModule(prompt_dims[level], num_prompts, prompt_sizes[level],
                                                   channels,
                                                   top_k=top_k, renormalize=renormalize,
                                                   route_bias=route_bias))
            self.fuses.append(nn.Conv2d(channels + prompt_dims[level], channels, 1, bias=False))
            up = nn.Conv2d(channels, 2 * channels, 1, bias=False)    # 2C channels -> C at twice the size
            self.ups.append(nn.Sequential(up, nn.PixelShuffle(2)))
            channels //= 2
            self.decoders.append(_blocks(channels, count))
        self.ending = nn.Conv2d(width, out_channels, 3, padding=1)

    def prompt_modules(self) -> list[SparsePromptModule]:
        """The prompt levels in application order (deepest first)."""
        return list(self.prompts)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise unless ``x`` is ``(B, inp_channels, H, W)`` with H, W multiples of ``size_multiple``."""
        check_image_batch("PromptNAFNet", x, self.inp_channels, self.size_multiple)

    def encode(self, x: torch.Tensor) -> NAFNetState:
        """Everything before the first prompt: intro, encoder levels, middle blocks."""
        self.check_input(x)
        h = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            h = encoder(h)
            skips.append(h)
            h = down(h)
        return NAFNetState(x, tuple(skips), self.middle(h))

    def decode(self, state: NAFNetState, routing: Sequence | None = None,
               return_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        """The prompted decoder. ``routing``: None or one entry per level (deepest first), each None,
        a ``Routing`` or a callable ``own -> Routing`` (see ``SparsePromptModule.forward``)."""
        if routing is None:
            routing = [None] * self.num_prompt_levels
        elif len(routing) != self.num_prompt_levels:
            raise ValueError(f"PromptNAFNet.decode: routing needs {self.num_prompt_levels} entries "
                             f"(one per decoder level), got {len(routing)}")
        used: list[Routing] = []
        h = state.latent
        for level, skip in enumerate(reversed(state.skips)):
            prompt, chosen = self.prompts[level](h, routing[level])
            used.append(chosen)
            h = self.fuses[level](torch.cat([h, prompt], dim=1))
            h = self.decoders[level](self.ups[level](h) + skip)
        out = self.ending(h) + state.image
        return (out, used) if return_routing else out

    def forward(self, x: torch.Tensor, routing: Sequence | None = None,
                return_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        """Restore ``x (B, inp_channels, H, W)``; ``decode(encode(x), routing, return_routing)``."""
        return self.decode(self.encode(x), routing, return_routing)


# Small widths for tests and smoke runs: two levels, one block each.
PRESETS["nafnet_tiny"] = {"type": "PromptNAFNet", "width": 8, "enc_blocks": (1, 1), "middle_blocks": 1,
                          "dec_blocks": (1, 1), "prompt_dims": (8, 4), "prompt_sizes": (4, 8), "top_k": 1}

"""PromptIR with Sparse Prompt Modules: the backbone of CPL.

The layout is the published PromptIR(decoder=True): a 4-level Restormer U-Net whose decoder gets
a prompt at three levels (latent, level 3, level 2). Parameter names match the published
checkpoints; the six 1x1 convolutions the published class builds but never uses
(``chnl_reduce1..3``, ``reduce_noise_channel_1..3``) are left out.

``encode`` runs everything before the first prompt, ``decode`` the rest, so a contrastive step
can encode once and decode several routings.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from cpl_fast.models.protocol import check_image_batch
from cpl_fast.models.registry import register_model
from cpl_fast.models.restormer import (
    Downsample,
    OverlapPatchEmbed,
    PointwiseConv2d,
    TransformerBlock,
    Upsample,
    transformer_stage,
)
from cpl_fast.models.spm import Routing, SparsePromptModule


class PromptIRState(NamedTuple):
    """The prompt-free part of a PromptIR forward, batch first: what the decoder reads."""

    image: torch.Tensor    # (B, 3, H, W): the input, added back at the output
    enc1: torch.Tensor     # (B, dim, H, W)
    enc2: torch.Tensor     # (B, 2 dim, H/2, W/2)
    enc3: torch.Tensor     # (B, 4 dim, H/4, W/4)
    latent: torch.Tensor   # (B, 8 dim, H/8, W/8)


@register_model
class SparsePromptIR(nn.Module):
    """PromptIR whose prompt blocks are Sparse Prompt Modules (``top_k=None``: PromptIR itself).

    Widths follow the published code: level ``l`` has ``dim * 2**(l-1)`` channels; each prompt
    level concatenates its prompt, runs one transformer block (``prompt_heads`` heads) and reduces
    back (to ``4 dim`` at the two deepest levels, ``2 dim`` at the last). The default has
    35,376,967 parameters with 5 prompts.
    """

    num_prompt_levels = 3
    size_multiple = 8
    # decode passes each routing entry to its SparsePromptModule, which also takes callables.
    accepts_routing_callables = True

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
                 num_prompts: int = 5, top_k: int | None = 1, renormalize: bool = False,
                 prompt_dims: Sequence[int] = (64, 128, 320),
                 prompt_sizes: Sequence[int] = (64, 32, 16), prompt_heads: int = 4,
                 route_bias: bool = False) -> None:
        super().__init__()
        for name, value in (("num_blocks", num_blocks), ("heads", heads)):
            if len(value) != 4:
                raise ValueError(f"SparsePromptIR: {name} needs 4 entries (one per level), "
                                 f"got {tuple(value)}")
        for name, value in (("prompt_dims", prompt_dims), ("prompt_sizes", prompt_sizes)):
            if len(value) != 3:
                raise ValueError(f"SparsePromptIR: {name} needs 3 entries (prompt1..3), got {tuple(value)}")
        self.inp_channels = inp_channels
        self.num_prompts = num_prompts
        self.top_k = top_k
        ffn = ffn_expansion_factor
        d1, d2, d3, d4 = dim, dim * 2, dim * 4, dim * 8

        self.patch_embed = OverlapPatchEmbed(inp_channels, d1)
        self.encoder_level1 = transformer_stage(d1, heads[0], num_blocks[0], ffn)
        self.down1_2 = Downsample(d1)
        self.encoder_level2 = transformer_stage(d2, heads[1], num_blocks[1], ffn)
        self.down2_3 = Downsample(d2)
        self.encoder_level3 = transformer_stage(d3, heads[2], num_blocks[2], ffn)
        self.down3_4 = Downsample(d3)
        self.latent = transformer_stage(d4, heads[3], num_blocks[3], ffn)

        def spm(level: int, lin_dim: int) -> SparsePromptModule:
            return SparsePromptModule(prompt_dims[level], num_prompts, prompt_sizes[level], lin_dim,
                                      top_k=top_k, renormalize=renormalize, route_bias=route_bias)

        # Level 4 -> 3: the latent's prompt; the published code reduces to 4 dim before upsampling.
        self.prompt3 = spm(2, d4)
        self.noise_level3 = TransformerBlock(d4 + prompt_dims[2], prompt_heads, ffn)
        self.reduce_noise_level3 = PointwiseConv2d(d4 + prompt_dims[2], d3)
        self.up4_3 = Upsample(d3)
        self.reduce_chan_level3 = PointwiseConv2d(d2 + d3, d3)
        self.decoder_level3 = transformer_stage(d3, heads[2], num_blocks[2], ffn)

        # Level 3 -> 2.
        self.prompt2 = spm(1, d3)
        self.noise_level2 = TransformerBlock(d3 + prompt_dims[1], prompt_heads, ffn)
        self.reduce_noise_level2 = PointwiseConv2d(d3 + prompt_dims[1], d3)
        self.up3_2 = Upsample(d3)
        self.reduce_chan_level2 = PointwiseConv2d(d2 + d2, d2)
        self.decoder_level2 = transformer_stage(d2, heads[1], num_blocks[1], ffn)

        # Level 2 -> 1: no channel reduction after the skip concat, so level 1 decodes at 2 dim.
        self.prompt1 = spm(0, d2)
        self.noise_level1 = TransformerBlock(d2 + prompt_dims[0], prompt_heads, ffn)
        self.reduce_noise_level1 = PointwiseConv2d(d2 + prompt_dims[0], d2)
        self.up2_1 = Upsample(d2)
        self.decoder_level1 = transformer_stage(d2, heads[0], num_blocks[0], ffn)
        self.refinement = transformer_stage(d2, heads[0], num_refinement_blocks, ffn)
        self.output = nn.Conv2d(d2, out_channels, kernel_size=3, padding=1, bias=False)

    def prompt_modules(self) -> list[SparsePromptModule]:
        """The prompt levels in application order (``prompt3, prompt2, prompt1``)."""
        return [self.prompt3, self.prompt2, self.prompt1]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise unless ``x`` is ``(B, inp_channels, H, W)`` with H, W multiples of ``size_multiple``."""
        check_image_batch("SparsePromptIR", x, self.inp_channels, self.size_multiple)

    def encode(self, x: torch.Tensor) -> PromptIRState:
        """Everything before the first prompt: encoder levels 1-3 and the latent stage."""
        self.check_input(x)
        enc1 = self.encoder_level1(self.patch_embed(x))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        return PromptIRState(x, enc1, enc2, enc3, latent)

    def decode(self, state: PromptIRState, routing: Sequence[Routing | None] | None = None,
               return_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        """The prompted decoder. ``routing``: None or one entry per level (prompt3, prompt2, prompt1)."""
        if routing is None:
            routing = [None] * self.num_prompt_levels
        elif len(routing) != self.num_prompt_levels:
            raise ValueError(f"SparsePromptIR.decode: routing needs {self.num_prompt_levels} entries "
                             f"(prompt3, prompt2, prompt1), got {len(routing)}")
        used: list[Routing] = []

        def prompted(x: torch.Tensor, level: int, spm: SparsePromptModule, block: TransformerBlock,
                     reduce: PointwiseConv2d) -> torch.Tensor:
            prompt, chosen = spm(x, routing[level])
            used.append(chosen)
            return reduce(block(torch.cat([x, prompt], dim=1)))

        x = prompted(state.latent, 0, self.prompt3, self.noise_level3, self.reduce_noise_level3)
        x = self.reduce_chan_level3(torch.cat([self.up4_3(x), state.enc3], dim=1))
        x = self.decoder_level3(x)
        x = prompted(x, 1, self.prompt2, self.noise_level2, self.reduce_noise_level2)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), state.enc2], dim=1))
        x = self.decoder_level2(x)
        x = prompted(x, 2, self.prompt1, self.noise_level1, self.reduce_noise_level1)
        x = torch.cat([self.up2_1(x), state.enc1], dim=1)
        x = self.refinement(self.decoder_level1(x))
        out = self.output(x) + state.image
        return (out, used) if return_routing else out

    def forward(self, x: torch.Tensor, routing: Sequence[Routing | None] | None = None,
                return_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        """Restore ``x (B, inp_channels, H, W)``; ``decode(encode(x), routing, return_routing)``."""
        return self.decode(self.encode(x), routing, return_routing)

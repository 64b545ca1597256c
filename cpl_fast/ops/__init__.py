"""cpl_fast's fused ops: one Python entry point each, several backends behind it."""
from __future__ import annotations

import torch

from cpl_fast.ops import channel_layernorm as _channel_layernorm_module
from cpl_fast.ops import cpr_distances as _cpr_distances_module
from cpl_fast.ops import depthwise_conv as _depthwise_conv_module
from cpl_fast.ops import gated_gelu as _gated_gelu_module
from cpl_fast.ops import prompt_mix as _prompt_mix_module
from cpl_fast.ops._reference import (
    channel_attention_reference,
    channel_layernorm_reference,
    cpr_distances_reference,
    depthwise_conv3x3_reference,
    gated_gelu_reference,
    pointwise_conv_reference,
    prompt_mix_materialized,
    prompt_mix_reference,
)
from cpl_fast.ops.channel_attention import channel_attention
from cpl_fast.ops.channel_layernorm import channel_layernorm
from cpl_fast.ops.cpr_distances import cpr_distances
from cpl_fast.ops.depthwise_conv import depthwise_conv3x3
from cpl_fast.ops.gated_gelu import gated_gelu
from cpl_fast.ops.pointwise_conv import pointwise_conv
from cpl_fast.ops.prompt_mix import prompt_mix

DISPATCHERS = {
    "prompt_mix": _prompt_mix_module.DISPATCHER,
    "cpr_distances": _cpr_distances_module.DISPATCHER,
    "channel_layernorm": _channel_layernorm_module.DISPATCHER,
    "gated_gelu": _gated_gelu_module.DISPATCHER,
    "depthwise_conv3x3": _depthwise_conv_module.DISPATCHER,
}


def available_backends(device: torch.device | str = "cpu") -> dict[str, dict[str, list[str]]]:
    """For every op and backend, why it cannot run on ``device`` (an empty list: available)."""
    device = torch.device(device)
    return {op: dispatcher.report(device) for op, dispatcher in DISPATCHERS.items()}


__all__ = ["prompt_mix", "cpr_distances", "channel_layernorm", "gated_gelu", "pointwise_conv",
           "channel_attention", "depthwise_conv3x3", "available_backends", "prompt_mix_reference",
           "prompt_mix_materialized",
           "cpr_distances_reference", "channel_layernorm_reference", "gated_gelu_reference",
           "pointwise_conv_reference", "channel_attention_reference",
           "depthwise_conv3x3_reference"]

"""Loss registry: configs pick the regularisation by ``type``.

``build_loss({"type": "cpr", "alpha": 0.01, "form": "ratio"})`` -> ``CPRLoss(alpha=0.01, form="ratio")``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from cpl_fast.losses.cpr import CPRLoss

LOSSES: dict[str, type[nn.Module]] = {"cpr": CPRLoss}


def build_loss(cfg: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``LOSSES[cfg["type"]]`` with the remaining keys as keyword arguments."""
    if "type" not in cfg:
        raise ValueError(f"loss config needs a 'type' key (one of {sorted(LOSSES)}), got keys {sorted(cfg)}")
    kwargs = dict(cfg)
    name = kwargs.pop("type")
    if name not in LOSSES:
        raise ValueError(f"unknown loss type '{name}'; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)

"""The device a ``device`` setting or ``--device`` option names, resolved the same way by every command."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the commands' --help must not wait for torch
    import torch


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when available, else the CPU. A bare ``cuda`` is this rank's GPU in a distributed
    job (``local_rank``), else the current one. ValueError naming the device when it is CUDA and the
    machine has none."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return device

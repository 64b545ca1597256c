"""Pieces shared by the backbone ops (``channel_layernorm``, ``gated_gelu``): backend availability and
dtype reasons, in the dispatcher's terms (see ``cpl_fast/ops/_dispatch.py``)."""
from __future__ import annotations

import importlib

import torch

from cpl_fast import _extension
from cpl_fast.ops._dispatch import triton_reasons

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOAD_ERROR = _extension.load_error()


def compiled_reasons(op: str, has_kernel: dict[str, bool], dispatch_key: str, device_type: str,
                     device: torch.device) -> list[str]:
    """Why ``cpl_fast._C``'s ``dispatch_key`` kernel of ``op`` cannot run on ``device``."""
    reasons = []
    if device.type != device_type:
        reasons.append(f"it runs on {device_type} tensors, not {device.type}")
    if LOAD_ERROR is not None:
        reasons.append(LOAD_ERROR)
    elif not has_kernel[dispatch_key]:
        reasons.append(f"cpl_fast._C was built without a {dispatch_key} kernel of {op}")
    return reasons


def dtype_reasons(dtypes: tuple[torch.dtype, ...], name: str):
    """``supports(x, *rest)`` for a backend that takes ``dtypes``: the reason when ``x``'s is not one."""
    def supports(x: torch.Tensor, *_args) -> list[str]:
        if x.dtype in dtypes:
            return []
        return [f"the {name} backend takes {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                f"not {str(x.dtype).removeprefix('torch.')}"]
    return supports


class TritonModule:
    """The lazily imported Triton kernels of one op (triton is slow to import and optional)."""

    def __init__(self, module: str) -> None:
        self.module = module
        self._error: list[str | None] = []

    def reasons(self, device: torch.device) -> list[str]:
        reasons = triton_reasons(device)
        if reasons:
            return reasons
        if not self._error:
            try:
                importlib.import_module(self.module)     # registers the op's triton_op
                self._error.append(None)
            except ImportError as exc:
                self._error.append(f"{self.module} failed to import: {exc}")
        return [self._error[0]] if self._error[0] is not None else []

"""Parametrisation of the fused providers shared by the op benchmarks.

Every fused backend is always a case, so that a CPU machine collects the GPU cases too (the
rehearsal of scripts/gpu_check.sh checks them) and skips each one with the dispatcher's own reasons;
the cases that need a GPU carry the ``gpu`` marker (``pytest bench/ -m gpu`` selects them).
"""
from __future__ import annotations

import pytest
import torch

from cpl_fast.ops._dispatch import Dispatcher

GPU_BACKENDS = ("cuda", "triton")


def fused_provider(dispatcher: Dispatcher, name: str, device: torch.device):
    """``pytest.param(name)``: skipped where the backend cannot run on ``device``, ``gpu`` if it needs one."""
    reasons = dispatcher.backends[name].available(device)
    why = f"{name} backend on {device.type}: {'; '.join(reasons)}"
    marks = [pytest.mark.skipif(bool(reasons), reason=why)]
    if name in GPU_BACKENDS:
        marks.append(pytest.mark.gpu)
    return pytest.param(name, marks=marks)

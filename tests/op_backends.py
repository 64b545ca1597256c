"""Shared by the backbone-op tests (test_channel_layernorm.py, test_gated_gelu.py): which (backend, device)
pairs run here, skips that carry the dispatcher's own reasons, and the re-run of a file's Triton cases under
``TRITON_INTERPRET=1`` (which must be set before triton is imported, hence a child process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-5)}


def _case(*values):
    """A parameter set; the ``gpu`` marker on the cases that run on a CUDA device (scripts/gpu_check.sh)."""
    return pytest.param(*values, marks=[pytest.mark.gpu] if values[1] == "cuda" else [])


# The Triton kernels on the GPU when there is one, else interpreted on the CPU.
_PAIRS = [("cpu", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu"), ("cuda", "cuda")]
BACKENDS = [_case(b, d) for b, d in _PAIRS]
BACKEND_IDS = [f"{b}-{d}" for b, d in _PAIRS]
LOW_PRECISION = [_case("cpu", "cpu", torch.bfloat16)] + [
    _case(b, "cuda", dt) for b in ("triton", "cuda") for dt in (torch.bfloat16, torch.float16)]


def backend_or_skip(dispatcher, name: str, device: str) -> None:
    """Skip with the backend's own reasons when it cannot run on ``device`` in this process."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if name == "triton" and device == "cpu" and not INTERPRETED:
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1: "
                    "covered by test_interpreted_kernels_in_subprocess")
    reasons = dispatcher.backends[name].available(torch.device(device))
    if reasons:
        pytest.skip(f"{name} backend unavailable: {'; '.join(reasons)}")


def run_interpreted(test_file: str) -> None:
    """Run ``test_file``'s Triton cases in a child process with TRITON_INTERPRET=1; fail with its output."""
    if INTERPRETED:
        pytest.skip("already under TRITON_INTERPRET=1: the Triton cases run in this process")
    if HAS_CUDA:
        pytest.skip("the Triton cases run on the CUDA device in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-k", "triton",
         test_file],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary, summary


def low_precision_check(fn_ref, fn_kernel, inputs, grad_out, dtype) -> None:
    """|kernel - ref_fp32| <= 2 |torch_lowprec - ref_fp32| + atol, for the output and every input gradient.

    ``fn_ref(*inputs)``/``fn_kernel(*inputs)``: the reference and the kernel; ``inputs`` in ``dtype``.
    """
    def run(fn, tensors, grad):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return [out.detach()] + [leaf.grad for leaf in leaves]

    ref32 = run(fn_ref, [t.float() for t in inputs], grad_out.float())
    torch_low = run(fn_ref, inputs, grad_out)
    kernel = run(fn_kernel, inputs, grad_out)
    for index, (got, low, want) in enumerate(zip(kernel, torch_low, ref32)):
        assert got.dtype == dtype
        atol = 1e-2 * max(1.0, want.abs().max().item())
        err = (got.float() - want).abs()
        budget = 2 * (low.float() - want).abs() + atol
        assert bool((err <= budget).all()), f"tensor {index}: max excess {(err - budget).max().item():.3g}"

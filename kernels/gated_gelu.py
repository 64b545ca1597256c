"""Triton kernels of the feed-forward gate ``gelu(x1) * x2``, registered as ``torch.library.triton_op``.

``cpl_fast::gated_gelu_triton(x)``: ``x (B, 2C, ...)`` -> ``gelu(x[:, :C]) * x[:, C:]`` with the exact (erf)
GELU; ``cpl_fast::_gated_gelu_triton_backward(grad, x)`` -> ``grad_x``, recomputing ``gelu(x1)``:
``grad_x1 = grad * x2 * (Phi(x1) + x1 phi(x1))``, ``grad_x2 = grad * gelu(x1)``. One program per (sample,
block of the ``C * H * W`` elements of a half); computed in float32 (float64 for float64 inputs). ``x`` and
``grad`` are read through ``.contiguous()``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from cpl_fast.ops.gated_gelu import half_shape, make_backward, setup_context

_BLOCK = 1024


@triton.jit
def _gated_gelu_fwd_kernel(x_ptr, out_ptr, M, USE_FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < M
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    a = tl.load(x_ptr + pid_b * 2 * M + offs, mask=mask, other=0.0).to(acc_dtype)
    g = tl.load(x_ptr + pid_b * 2 * M + M + offs, mask=mask, other=0.0).to(acc_dtype)
    cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
    tl.store(out_ptr + pid_b * M + offs, (a * cdf * g).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_gelu_bwd_kernel(grad_ptr, x_ptr, dx_ptr, M, USE_FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < M
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    gr = tl.load(grad_ptr + pid_b * M + offs, mask=mask, other=0.0).to(acc_dtype)
    a = tl.load(x_ptr + pid_b * 2 * M + offs, mask=mask, other=0.0).to(acc_dtype)
    g = tl.load(x_ptr + pid_b * 2 * M + M + offs, mask=mask, other=0.0).to(acc_dtype)
    cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
    density = 0.3989422804014327 * tl.exp(-0.5 * a * a)
    da = gr * g * (cdf + a * density)
    dg = gr * a * cdf
    tl.store(dx_ptr + pid_b * 2 * M + offs, da.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + pid_b * 2 * M + M + offs, dg.to(dx_ptr.dtype.element_ty), mask=mask)


def _half(x: torch.Tensor) -> int:
    return x[0].numel() // 2 if x.shape[0] else 0


@triton_op("cpl_fast::gated_gelu_triton", mutates_args=())
def gated_gelu_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton forward; arguments as ``cpl_fast.ops.gated_gelu`` (validated there)."""
    x = x.contiguous()
    out = x.new_empty(half_shape(x))
    half = _half(x)
    if out.numel():
        wrap_triton(_gated_gelu_fwd_kernel)[(x.shape[0], triton.cdiv(half, _BLOCK))](
            x, out, half, USE_FP64=x.dtype == torch.float64, BLOCK=_BLOCK)
    return out


@triton_op("cpl_fast::_gated_gelu_triton_backward", mutates_args=())
def gated_gelu_triton_backward(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad_x`` of :func:`gated_gelu_triton` for the output gradient ``grad_out``."""
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    grad_x = torch.empty_like(x)
    half = _half(x)
    if grad_x.numel():
        wrap_triton(_gated_gelu_bwd_kernel)[(x.shape[0], triton.cdiv(half, _BLOCK))](
            grad_out, x, grad_x, half, USE_FP64=x.dtype == torch.float64, BLOCK=_BLOCK)
    return grad_x


gated_gelu_triton.register_autograd(make_backward(torch.ops.cpl_fast._gated_gelu_triton_backward),
                                    setup_context=setup_context)

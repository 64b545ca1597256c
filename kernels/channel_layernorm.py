"""Triton kernels of the channel layer norm, registered as ``torch.library.triton_op``.

``cpl_fast::channel_layernorm_triton(x, weight, bias, eps) -> (out, mean, rstd)``: the layer norm over dim 1
of ``x (B, C, ...)`` at every pixel (with ``bias``: Restormer's with-bias norm; ``None``: the bias-free one,
``x * rstd * weight``), as ``cpl_fast::channel_layernorm``.

* Forward: one program per (sample, block of pixels); the block's pixels are contiguous in every channel
  plane, so the three loops over the channels (mean, centred variance, output) read coalesced rows.
* Backward (``cpl_fast::_channel_layernorm_triton_backward``): the same traversal computes
  ``s1 = sum_c g w`` and ``s2 = sum_c g w n`` per pixel, then ``grad_x``; each program also writes its share
  of ``grad_weight = sum g n`` and ``grad_bias = sum g`` for every channel to its own slot, and the slots
  are summed afterwards: no atomics, so the result is reproducible.

Accumulation is float32, or float64 for float64 inputs. ``x`` and ``grad_out`` are read through
``.contiguous()`` (free for the model's activations). Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from cpl_fast.ops.channel_layernorm import make_backward, setup_context

_BLOCK = 128


@triton.jit
def _channel_layernorm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, C, N, eps,
    HAS_BIAS: tl.constexpr, USE_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    offs = pid_p * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < N
    base = pid_b * C * N + offs
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    total = tl.zeros([BLOCK], dtype=acc_dtype)
    for c in range(0, C):
        total += tl.load(x_ptr + base + c * N, mask=mask, other=0.0).to(acc_dtype)
    mean = total / C
    var = tl.zeros([BLOCK], dtype=acc_dtype)
    for c in range(0, C):
        d = tl.load(x_ptr + base + c * N, mask=mask, other=0.0).to(acc_dtype) - mean
        var += d * d
    rstd = 1.0 / tl.sqrt(var / C + eps)
    for c in range(0, C):
        xv = tl.load(x_ptr + base + c * N, mask=mask, other=0.0).to(acc_dtype)
        wc = tl.load(w_ptr + c).to(acc_dtype)
        if HAS_BIAS:
            y = (xv - mean) * rstd * wc + tl.load(b_ptr + c).to(acc_dtype)
        else:
            y = xv * rstd * wc
        tl.store(out_ptr + base + c * N, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pid_b * N + offs, mean, mask=mask)
    tl.store(rstd_ptr + pid_b * N + offs, rstd, mask=mask)


@triton.jit
def _channel_layernorm_bwd_kernel(
    g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, pw_ptr, pb_ptr, C, N, NPROG,
    WITH_BIAS: tl.constexpr, USE_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """dx; pw[c, slot] = this program's sum of g n, pb[c, slot] = its sum of g (slot = program index)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    slot = pid_b * tl.num_programs(1) + pid_p
    offs = pid_p * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < N
    base = pid_b * C * N + offs
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    mean = tl.load(mean_ptr + pid_b * N + offs, mask=mask, other=0.0).to(acc_dtype)
    rstd = tl.load(rstd_ptr + pid_b * N + offs, mask=mask, other=0.0).to(acc_dtype)
    # n, the normalised value: (x - mean) rstd with bias, x rstd without (the bias-free norm does not centre).
    sub = mean if WITH_BIAS else tl.zeros([BLOCK], dtype=acc_dtype)
    s1 = tl.zeros([BLOCK], dtype=acc_dtype)
    s2 = tl.zeros([BLOCK], dtype=acc_dtype)
    for c in range(0, C):
        g = tl.load(g_ptr + base + c * N, mask=mask, other=0.0).to(acc_dtype)
        xv = tl.load(x_ptr + base + c * N, mask=mask, other=0.0).to(acc_dtype)
        wc = tl.load(w_ptr + c).to(acc_dtype)
        n = (xv - sub) * rstd
        s1 += g * wc
        s2 += g * wc * n
        tl.store(pw_ptr + c * NPROG + slot, tl.sum(g * n, axis=0))
        tl.store(pb_ptr + c * NPROG + slot, tl.sum(g, axis=0))
    a = s1 / C if WITH_BIAS else tl.zeros([BLOCK], dtype=acc_dtype)
    s2 = s2 / C
    for c in range(0, C):
        g = tl.load(g_ptr + base + c * N, mask=mask, other=0.0).to(acc_dtype)
        xv = tl.load(x_ptr + base + c * N, mask=mask, other=0.0).to(acc_dtype)
        wc = tl.load(w_ptr + c).to(acc_dtype)
        xhat = (xv - mean) * rstd
        dx = rstd * (g * wc - a - xhat * s2)
        tl.store(dx_ptr + base + c * N, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _pixels(x: torch.Tensor) -> int:
    return x[0, 0].numel() if x.shape[0] and x.shape[1] else 0


@triton_op("cpl_fast::channel_layernorm_triton", mutates_args=())
def channel_layernorm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward; arguments as ``cpl_fast.ops.channel_layernorm`` (validated there)."""
    x = x.contiguous()
    batch, channels, pixels = x.shape[0], x.shape[1], _pixels(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stat_shape = (batch,) + tuple(x.shape[2:])
    out = torch.empty_like(x)
    mean = torch.empty(stat_shape, dtype=acc, device=x.device)
    rstd = torch.empty(stat_shape, dtype=acc, device=x.device)
    if x.numel():
        wrap_triton(_channel_layernorm_fwd_kernel)[(batch, triton.cdiv(pixels, _BLOCK))](
            x, weight, bias if bias is not None else weight, out, mean, rstd, channels, pixels, eps,
            HAS_BIAS=bias is not None, USE_FP64=x.dtype == torch.float64, BLOCK=_BLOCK,
        )
    return out, mean, rstd


@triton_op("cpl_fast::_channel_layernorm_triton_backward", mutates_args=())
def channel_layernorm_triton_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                      mean: torch.Tensor, rstd: torch.Tensor,
                                      with_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`channel_layernorm_triton`."""
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    batch, channels, pixels = x.shape[0], x.shape[1], _pixels(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks = triton.cdiv(pixels, _BLOCK)
    nprog = batch * blocks
    grad_x = torch.empty_like(x)
    partial_w = torch.zeros((channels, nprog), dtype=acc, device=x.device)
    partial_b = torch.zeros((channels, nprog), dtype=acc, device=x.device)
    if x.numel():
        wrap_triton(_channel_layernorm_bwd_kernel)[(batch, blocks)](
            grad_out, x, weight, mean, rstd, grad_x, partial_w, partial_b, channels, pixels, nprog,
            WITH_BIAS=with_bias, USE_FP64=x.dtype == torch.float64, BLOCK=_BLOCK,
        )
    return grad_x, partial_w.sum(1).to(weight.dtype), partial_b.sum(1).to(weight.dtype)


channel_layernorm_triton.register_autograd(
    make_backward(torch.ops.cpl_fast._channel_layernorm_triton_backward), setup_context=setup_context)

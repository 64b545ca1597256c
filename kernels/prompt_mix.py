"""Triton kernels of the sparse prompt mix, registered as ``torch.library.triton_op``.

``out[b, c] = sum_j weights[b, j] * bilinear(bank[indices[b, j], c], (H, W))`` with PyTorch's
``align_corners=False`` bilinear rule (``src = max((dst + 0.5) * in / out - 0.5, 0)``).

* ``cpl_fast::prompt_mix_triton``: one program per (sample, channel, block of output pixels); each
  pixel reads its four source pixels of each of the ``k`` selected experts.
* ``cpl_fast::_prompt_mix_triton_backward``: the same traversal; every output pixel spreads
  ``weights[b, j] * lambda * grad`` onto its four source pixels with ``tl.atomic_add`` into a
  float32 (float64 for float64 inputs) copy of ``grad_bank``, so ``grad_bank`` is not bitwise
  reproducible (``atomic_backward=True`` in the dispatcher). ``grad_weights`` is deterministic: every
  program writes its partial dot product to its own slot and the slots are summed afterwards.

Accumulation is float32, or float64 for float64 inputs (so the interpreter test in float64 is
exact). Offsets are int64. Strides are passed, so no input is copied. Written with plain pointer
arithmetic and masked ``tl.load``/``tl.store``/``tl.atomic_add`` only (no block pointers, which newer
Triton releases removed), so older and newer Triton 3.x releases compile the same source.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_BLOCK = 256


@triton.jit
def _source_index(dst, in_size, out_size, USE_FP64: tl.constexpr):
    """PyTorch's align_corners=False source position of output index ``dst`` on one axis.

    Returns ``(i0, i1, lambda0, lambda1)``: the output reads ``lambda0 * x[i0] + lambda1 * x[i1]``.
    """
    if USE_FP64:
        d = dst.to(tl.float64)
        scale = tl.full([], in_size, tl.float64) / tl.full([], out_size, tl.float64)
    else:
        d = dst.to(tl.float32)
        scale = tl.full([], in_size, tl.float32) / tl.full([], out_size, tl.float32)
    src = tl.maximum(scale * (d + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int64), in_size - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(src.dtype), 0.0), 1.0)
    # Same size: PyTorch copies (i1 = i0, lambda1 = 0); otherwise the next index, clamped at the edge.
    i1 = tl.where((i0 < in_size - 1) & (in_size != out_size), i0 + 1, i0)
    lam = tl.where(in_size != out_size, lam, 0.0)
    return i0, i1, 1.0 - lam, lam


@triton.jit
def _prompt_mix_fwd_kernel(
    bank_ptr, idx_ptr, w_ptr, out_ptr,
    C, S, SP, H, W, K,
    s_bn, s_bc, s_bh, s_bw, s_ib, s_ik, s_wb, s_wk,
    USE_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_bc = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    b = pid_bc // C
    c = pid_bc % C
    offs = pid_p * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < H * W
    h = offs // W
    w = offs % W
    y0, y1, ly0, ly1 = _source_index(h, S, H, USE_FP64)
    x0, x1, lx0, lx1 = _source_index(w, SP, W, USE_FP64)
    acc = tl.zeros([BLOCK], dtype=ly0.dtype)
    for j in range(0, K):
        i = tl.load(idx_ptr + b * s_ib + j * s_ik).to(tl.int64)
        wj = tl.load(w_ptr + b * s_wb + j * s_wk).to(acc.dtype)
        base = bank_ptr + i * s_bn + c * s_bc
        v00 = tl.load(base + y0 * s_bh + x0 * s_bw, mask=mask, other=0.0).to(acc.dtype)
        v01 = tl.load(base + y0 * s_bh + x1 * s_bw, mask=mask, other=0.0).to(acc.dtype)
        v10 = tl.load(base + y1 * s_bh + x0 * s_bw, mask=mask, other=0.0).to(acc.dtype)
        v11 = tl.load(base + y1 * s_bh + x1 * s_bw, mask=mask, other=0.0).to(acc.dtype)
        acc += wj * (ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11))
    tl.store(out_ptr + pid_bc * H * W + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prompt_mix_bwd_kernel(
    grad_ptr, bank_ptr, idx_ptr, w_ptr, gbank_ptr, partial_ptr,
    C, S, SP, H, W, K, NBLK,
    s_gb, s_gc, s_gh, s_gw, s_bn, s_bc, s_bh, s_bw, s_ib, s_ik, s_wb, s_wk,
    USE_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_bank (contiguous, accumulation dtype) += atomics; partial[(b*K + j), c*NBLK + block] = dot."""
    pid_bc = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    b = pid_bc // C
    c = pid_bc % C
    offs = pid_p * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < H * W
    h = offs // W
    w = offs % W
    y0, y1, ly0, ly1 = _source_index(h, S, H, USE_FP64)
    x0, x1, lx0, lx1 = _source_index(w, SP, W, USE_FP64)
    g = tl.load(grad_ptr + b * s_gb + c * s_gc + h * s_gh + w * s_gw, mask=mask, other=0.0).to(ly0.dtype)
    for j in range(0, K):
        i = tl.load(idx_ptr + b * s_ib + j * s_ik).to(tl.int64)
        wj = tl.load(w_ptr + b * s_wb + j * s_wk).to(g.dtype)
        base = bank_ptr + i * s_bn + c * s_bc
        v00 = tl.load(base + y0 * s_bh + x0 * s_bw, mask=mask, other=0.0).to(g.dtype)
        v01 = tl.load(base + y0 * s_bh + x1 * s_bw, mask=mask, other=0.0).to(g.dtype)
        v10 = tl.load(base + y1 * s_bh + x0 * s_bw, mask=mask, other=0.0).to(g.dtype)
        v11 = tl.load(base + y1 * s_bh + x1 * s_bw, mask=mask, other=0.0).to(g.dtype)
        value = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
        tl.store(partial_ptr + (b * K + j) * C * NBLK + c * NBLK + pid_p, tl.sum(g * value, axis=0))
        gw = wj * g
        plane = gbank_ptr + (i * C + c) * S * SP
        tl.atomic_add(plane + y0 * SP + x0, gw * ly0 * lx0, mask=mask)
        tl.atomic_add(plane + y0 * SP + x1, gw * ly0 * lx1, mask=mask)
        tl.atomic_add(plane + y1 * SP + x0, gw * ly1 * lx0, mask=mask)
        tl.atomic_add(plane + y1 * SP + x1, gw * ly1 * lx1, mask=mask)


@triton_op("cpl_fast::prompt_mix_triton", mutates_args=())
def prompt_mix_triton(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                      height: int, width: int) -> torch.Tensor:
    """Triton forward; arguments as ``cpl_fast.ops.prompt_mix`` (validated there)."""
    batch, k = indices.shape
    channels = bank.shape[1]
    out = bank.new_empty((batch, channels, height, width))
    grid = (batch * channels, triton.cdiv(height * width, _BLOCK))
    wrap_triton(_prompt_mix_fwd_kernel)[grid](
        bank, indices, weights, out,
        channels, bank.shape[2], bank.shape[3], height, width, k,
        bank.stride(0), bank.stride(1), bank.stride(2), bank.stride(3),
        indices.stride(0), indices.stride(1), weights.stride(0), weights.stride(1),
        USE_FP64=bank.dtype == torch.float64, BLOCK=_BLOCK,
    )
    return out


@triton_op("cpl_fast::_prompt_mix_triton_backward", mutates_args=())
def prompt_mix_triton_backward(grad_out: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor,
                               weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_bank, grad_weights)`` of :func:`prompt_mix_triton` for the output gradient ``grad_out``."""
    batch, k = indices.shape
    channels, height, width = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
    acc_dtype = torch.float64 if bank.dtype == torch.float64 else torch.float32
    nblk = triton.cdiv(height * width, _BLOCK)
    grad_bank = torch.zeros(bank.shape, dtype=acc_dtype, device=bank.device)
    partial = torch.empty((batch * k, channels * nblk), dtype=acc_dtype, device=bank.device)
    wrap_triton(_prompt_mix_bwd_kernel)[(batch * channels, nblk)](
        grad_out, bank, indices, weights, grad_bank, partial,
        channels, bank.shape[2], bank.shape[3], height, width, k, nblk,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        bank.stride(0), bank.stride(1), bank.stride(2), bank.stride(3),
        indices.stride(0), indices.stride(1), weights.stride(0), weights.stride(1),
        USE_FP64=bank.dtype == torch.float64, BLOCK=_BLOCK,
    )
    grad_weights = partial.sum(1).reshape(batch, k).to(weights.dtype)
    return grad_bank.to(bank.dtype), grad_weights


def _setup_context(ctx, inputs, output) -> None:
    bank, indices, weights, _height, _width = inputs
    ctx.save_for_backward(bank, indices, weights)


def _backward(ctx, grad_out: torch.Tensor):
    bank, indices, weights = ctx.saved_tensors
    grad_bank, grad_weights = torch.ops.cpl_fast._prompt_mix_triton_backward(grad_out, bank, indices, weights)
    return grad_bank, None, grad_weights, None, None


prompt_mix_triton.register_autograd(_backward, setup_context=_setup_context)

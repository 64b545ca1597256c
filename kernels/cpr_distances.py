"""Triton kernels of cpr_distances, registered as ``cpl_fast::cpr_distances_triton`` (with autograd).

Forward: one program per (chunk of ``BLOCK`` elements, sample) loads its slice of ``f_pos`` once, compares
it with ``f_gt`` and with all ``m`` negatives (a ``(M_PAD, BLOCK)`` tile) and writes one partial sum per
distance; the partials are then summed by ``torch.sum`` (no atomics: results are reproducible). Backward:
one elementwise pass writing the gradients of ``f_pos``, ``f_gt`` and every negative. Accumulation is in
float32 (float64 for float64 inputs): the dtype of the host-allocated partial/coefficient buffers.
Plain pointer arithmetic only (no block pointers), so the kernels run on Triton 3.x and its interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from cpl_fast.ops.cpr_distances import check_inputs, dense_samples

MAX_BLOCK = 1024
MAX_TILE = 8192  # elements of the (M_PAD, BLOCK) tile of negatives held in registers by one program


@triton.jit
def _forward_partials_kernel(pos_ptr, gt_ptr, neg_ptr, part_pos_ptr, part_neg_ptr,
                             batch, m, n, chunks, stride_pos_b, stride_gt_b, stride_neg_t, stride_neg_b,
                             BLOCK: tl.constexpr, M_PAD: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    acc_dtype = part_pos_ptr.dtype.element_ty
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.arange(0, M_PAD).to(tl.int64)
    t_mask = t < m

    p = tl.load(pos_ptr + b * stride_pos_b + offs, mask=mask, other=0.0).to(acc_dtype)
    g = tl.load(gt_ptr + b * stride_gt_b + offs, mask=mask, other=0.0).to(acc_dtype)
    d = p - g
    tl.store(part_pos_ptr + b * chunks + chunk, tl.sum(d * d, axis=0))

    neg_mask = t_mask[:, None] & mask[None, :]
    negs = tl.load(neg_ptr + t[:, None] * stride_neg_t + b * stride_neg_b + offs[None, :],
                   mask=neg_mask, other=0.0).to(acc_dtype)
    dn = tl.where(neg_mask, negs - p[None, :], 0.0)
    tl.store(part_neg_ptr + (b * m + t) * chunks + chunk, tl.sum(dn * dn, axis=1), mask=t_mask)


@triton.jit
def _backward_kernel(pos_ptr, gt_ptr, neg_ptr, c_pos_ptr, c_neg_ptr, grad_pos_ptr, grad_gt_ptr, grad_neg_ptr,
                     batch, m, n, stride_pos_b, stride_gt_b, stride_neg_t, stride_neg_b,
                     BLOCK: tl.constexpr, M_PAD: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    acc_dtype = c_pos_ptr.dtype.element_ty
    out_dtype = grad_pos_ptr.dtype.element_ty
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.arange(0, M_PAD).to(tl.int64)
    t_mask = t < m

    p = tl.load(pos_ptr + b * stride_pos_b + offs, mask=mask, other=0.0).to(acc_dtype)
    g = tl.load(gt_ptr + b * stride_gt_b + offs, mask=mask, other=0.0).to(acc_dtype)
    grad_pos = tl.load(c_pos_ptr + b) * (p - g)
    tl.store(grad_gt_ptr + b * n + offs, (-grad_pos).to(out_dtype), mask=mask)

    neg_mask = t_mask[:, None] & mask[None, :]
    negs = tl.load(neg_ptr + t[:, None] * stride_neg_t + b * stride_neg_b + offs[None, :],
                   mask=neg_mask, other=0.0).to(acc_dtype)
    c_neg = tl.load(c_neg_ptr + b * m + t, mask=t_mask, other=0.0)
    grad_neg = tl.where(neg_mask, c_neg[:, None] * (negs - p[None, :]), 0.0)
    tl.store(grad_neg_ptr + (t[:, None] * batch + b) * n + offs[None, :], grad_neg.to(out_dtype),
             mask=neg_mask)
    tl.store(grad_pos_ptr + b * n + offs, (grad_pos - tl.sum(grad_neg, axis=0)).to(out_dtype), mask=mask)


def _block(n: int, m: int) -> int:
    """Elements per program: a power of two, at most MAX_BLOCK, small enough for the tile of m negatives."""
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(n), MAX_TILE // triton.next_power_of_2(m)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(neg_weights: torch.Tensor | None, batch: int, m: int, like: torch.Tensor) -> torch.Tensor:
    if neg_weights is None:
        return torch.ones((batch, m), dtype=like.dtype, device=like.device)
    return neg_weights.to(like.dtype)


@triton_op("cpl_fast::cpr_distances_triton", mutates_args=(),
           schema="(Tensor f_pos, Tensor f_gt, Tensor f_neg, Tensor? neg_weights) -> (Tensor, Tensor)")
def cpr_distances_triton(f_pos: torch.Tensor, f_gt: torch.Tensor, f_neg: torch.Tensor,
                         neg_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(l_pos, l_neg)``, each ``(B,)``: see cpl_fast.ops.cpr_distances."""
    batch, m, n = check_inputs(f_pos, f_gt, f_neg, neg_weights)
    f_pos, f_gt, f_neg = dense_samples(f_pos, 1), dense_samples(f_gt, 1), dense_samples(f_neg, 2)
    block = _block(n, m)
    chunks = triton.cdiv(n, block)
    acc = _acc_dtype(f_pos.dtype)
    part_pos = torch.empty((batch, chunks), dtype=acc, device=f_pos.device)
    part_neg = torch.empty((batch, m, chunks), dtype=acc, device=f_pos.device)
    wrap_triton(_forward_partials_kernel)[(chunks, batch)](
        f_pos, f_gt, f_neg, part_pos, part_neg, batch, m, n, chunks,
        f_pos.stride(0), f_gt.stride(0), f_neg.stride(0), f_neg.stride(1),
        BLOCK=block, M_PAD=triton.next_power_of_2(m))
    l_pos = part_pos.sum(1) / n
    l_neg = (part_neg.sum(2) / n * _weights(neg_weights, batch, m, part_neg)).sum(1) / m
    return l_pos.to(f_pos.dtype), l_neg.to(f_pos.dtype)


@triton_op("cpl_fast::_cpr_distances_backward_triton", mutates_args=(),
           schema="(Tensor grad_l_pos, Tensor grad_l_neg, Tensor f_pos, Tensor f_gt, Tensor f_neg, "
                  "Tensor? neg_weights) -> (Tensor, Tensor, Tensor)")
def cpr_distances_backward_triton(grad_l_pos: torch.Tensor, grad_l_neg: torch.Tensor, f_pos: torch.Tensor,
                                  f_gt: torch.Tensor, f_neg: torch.Tensor, neg_weights: torch.Tensor | None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_f_pos, grad_f_gt, grad_f_neg)``, contiguous; ``neg_weights`` get no gradient."""
    batch, m, n = check_inputs(f_pos, f_gt, f_neg, neg_weights)
    f_pos, f_gt, f_neg = dense_samples(f_pos, 1), dense_samples(f_gt, 1), dense_samples(f_neg, 2)
    acc = _acc_dtype(f_pos.dtype)
    # grad_f_gt = -c_pos (f_pos - f_gt), grad_f_neg = c_neg (f_neg - f_pos),
    # grad_f_pos = -grad_f_gt - sum_t grad_f_neg
    c_pos = (grad_l_pos.to(acc) * (2.0 / n)).contiguous()
    weights = _weights(neg_weights, batch, m, c_pos)
    c_neg = (grad_l_neg.to(acc).unsqueeze(1) * weights * (2.0 / (n * m))).contiguous()
    grad_pos = torch.empty(f_pos.shape, dtype=f_pos.dtype, device=f_pos.device)
    grad_gt = torch.empty(f_gt.shape, dtype=f_gt.dtype, device=f_gt.device)
    grad_neg = torch.empty(f_neg.shape, dtype=f_neg.dtype, device=f_neg.device)
    block = _block(n, m)
    wrap_triton(_backward_kernel)[(triton.cdiv(n, block), batch)](
        f_pos, f_gt, f_neg, c_pos, c_neg, grad_pos, grad_gt, grad_neg, batch, m, n,
        f_pos.stride(0), f_gt.stride(0), f_neg.stride(0), f_neg.stride(1),
        BLOCK=block, M_PAD=triton.next_power_of_2(m))
    return grad_pos, grad_gt, grad_neg


def _setup_context(ctx, inputs, output) -> None:
    f_pos, f_gt, f_neg, neg_weights = inputs
    ctx.save_for_backward(f_pos, f_gt, f_neg, neg_weights)


def _backward(ctx, grad_l_pos, grad_l_neg):
    f_pos, f_gt, f_neg, neg_weights = ctx.saved_tensors
    grad_pos, grad_gt, grad_neg = cpr_distances_backward_triton(grad_l_pos, grad_l_neg, f_pos, f_gt, f_neg,
                                                                neg_weights)
    return grad_pos, grad_gt, grad_neg, None


cpr_distances_triton.register_autograd(_backward, setup_context=_setup_context)

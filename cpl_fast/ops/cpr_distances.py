"""Per-sample contrastive distances ``(L_pos, L_neg)`` of one feature layer, fused.

``l_pos[b] = mean((f_pos[b] - f_gt[b])**2)`` and
``l_neg[b] = (1/m) sum_t w[b, t] mean((f_neg[t, b] - f_pos[b])**2)``. The fused kernels read every element
of ``f_pos`` once for the ground-truth term and all ``m`` negatives, and the backward writes the gradients of
``f_pos``, ``f_gt`` and every negative in one pass. ``f_pos`` and ``f_neg`` are typically views of one
feature tensor of ``(1 + m) B`` rows (``feats[:B]`` and ``feats[B:].view(m, B, ...)``); the kernels read such
views in place (any batch strides, each sample a dense run of elements; other layouts are copied once).

``neg_weights`` get no gradient: they are constants (a task-similarity matrix), not parameters.

Backends: ``reference`` (plain PyTorch), ``cpu`` (C++), ``cuda`` (CUDA C++), ``triton``
(``cpl_fast.kernels.cpr_distances``). The compiled op ``cpl_fast::cpr_distances`` gets its fake kernel and
autograd here, when the extension loaded.
"""
from __future__ import annotations

import torch

from cpl_fast.ops._dispatch import kernel_dispatcher
from cpl_fast.ops._reference import cpr_distances_reference

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_inputs(f_pos: torch.Tensor, f_gt: torch.Tensor, f_neg: torch.Tensor,
                 neg_weights: torch.Tensor | None) -> tuple[int, int, int]:
    """Validate the arguments of cpr_distances; return ``(B, m, N)`` (N: elements per sample).

    Raises ValueError for shapes and devices, TypeError for dtypes, each naming the offending values.
    """
    for name, t in (("f_pos", f_pos), ("f_gt", f_gt), ("f_neg", f_neg)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cpr_distances: {name} must be a tensor, got {type(t).__name__}")
    if f_pos.dim() < 1:
        raise ValueError(f"cpr_distances: f_pos must have a batch dimension, got shape {tuple(f_pos.shape)}")
    if f_gt.shape != f_pos.shape:
        raise ValueError(f"cpr_distances: f_gt shape {tuple(f_gt.shape)} does not match "
                         f"f_pos shape {tuple(f_pos.shape)}")
    if f_neg.dim() != f_pos.dim() + 1 or f_neg.shape[1:] != f_pos.shape:
        trailing = ", ".join(map(str, f_pos.shape))
        raise ValueError(f"cpr_distances: f_neg must have shape (m, *f_pos.shape) = (m, {trailing}), "
                         f"got {tuple(f_neg.shape)}")
    batch, m = f_pos.shape[0], f_neg.shape[0]
    if batch == 0:
        raise ValueError(f"cpr_distances: empty batch (B = 0), shape {tuple(f_pos.shape)}")
    if m == 0:
        raise ValueError("cpr_distances: f_neg has no negatives (m = 0)")
    if not f_pos.dtype.is_floating_point:
        raise TypeError(f"cpr_distances: features must be floating point, got {f_pos.dtype}")
    if f_gt.dtype != f_pos.dtype or f_neg.dtype != f_pos.dtype:
        raise TypeError(f"cpr_distances: f_pos, f_gt and f_neg must share one dtype, got {f_pos.dtype}, "
                        f"{f_gt.dtype} and {f_neg.dtype}")
    if f_gt.device != f_pos.device or f_neg.device != f_pos.device:
        raise ValueError(f"cpr_distances: f_pos, f_gt and f_neg must be on one device, got {f_pos.device}, "
                         f"{f_gt.device} and {f_neg.device}")
    per_sample = 1
    for size in f_pos.shape[1:]:
        per_sample *= size
    if per_sample == 0:
        raise ValueError(f"cpr_distances: features have no elements per sample, shape {tuple(f_pos.shape)}")
    if neg_weights is not None:
        if not isinstance(neg_weights, torch.Tensor):
            raise TypeError("cpr_distances: neg_weights must be a tensor or None, "
                            f"got {type(neg_weights).__name__}")
        if neg_weights.shape != (batch, m):
            raise ValueError(f"cpr_distances: neg_weights must have shape (B, m) = ({batch}, {m}), "
                             f"got {tuple(neg_weights.shape)}")
        if not neg_weights.dtype.is_floating_point:
            raise TypeError(f"cpr_distances: neg_weights must be floating point, got {neg_weights.dtype}")
        if neg_weights.device != f_pos.device:
            raise ValueError(f"cpr_distances: neg_weights is on {neg_weights.device}, "
                             f"the features on {f_pos.device}")
    return batch, m, per_sample


def dense_samples(t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``t`` itself when every sample (the dims after the first ``batch_dims``) is one dense row-major run.

    The kernels take arbitrary batch strides, so views such as ``feats[:B]`` are read in place; any other
    layout (a strided slice inside a sample, channels-last) is copied once, here and only here. Size-1
    dims may have any stride. Mirrors ``dense_samples`` in csrc/cpr_distances/cpr_distances_common.h.
    """
    expected = 1
    for size, stride in reversed(list(zip(t.shape[batch_dims:], t.stride()[batch_dims:]))):
        if size == 1:
            continue
        if stride != expected:
            return t.contiguous()
        expected *= size
    return t


def _compiled(f_pos, f_gt, f_neg, neg_weights):
    return torch.ops.cpl_fast.cpr_distances(f_pos, f_gt, f_neg, neg_weights)


def _triton(f_pos, f_gt, f_neg, neg_weights):
    return torch.ops.cpl_fast.cpr_distances_triton(f_pos, f_gt, f_neg, neg_weights)


# Every backend takes every floating dtype of SUPPORTED_DTYPES; the fused backward has no atomics.
DISPATCHER = kernel_dispatcher("cpr_distances", reference=cpr_distances_reference, compiled=_compiled,
                               triton=_triton, triton_module="cpl_fast.kernels.cpr_distances",
                               cpu_dtypes=SUPPORTED_DTYPES, gpu_dtypes=SUPPORTED_DTYPES)


def cpr_distances(f_pos: torch.Tensor, f_gt: torch.Tensor, f_neg: torch.Tensor,
                  neg_weights: torch.Tensor | None = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(l_pos, l_neg)``, each ``(B,)`` in the features' dtype.

    f_pos, f_gt ``(B, ...)``; f_neg ``(m, B, ...)``; neg_weights ``(B, m)`` or None (all ones; no gradient).
    ``backend``: ``"auto"`` (the fastest available for the device), or one of reference, cpu, cuda, triton.
    """
    check_inputs(f_pos, f_gt, f_neg, neg_weights)
    return DISPATCHER(f_pos, f_gt, f_neg, neg_weights, backend=backend, device=f_pos.device)


def _register_compiled() -> None:
    """Fake kernels and autograd of the compiled ``cpl_fast::cpr_distances`` (schemas: csrc/ops.cpp)."""

    @torch.library.register_fake("cpl_fast::cpr_distances")
    def _fake(f_pos, f_gt, f_neg, neg_weights):
        batch = check_inputs(f_pos, f_gt, f_neg, neg_weights)[0]
        return f_pos.new_empty((batch,)), f_pos.new_empty((batch,))

    @torch.library.register_fake("cpl_fast::_cpr_distances_backward")
    def _fake_backward(grad_l_pos, grad_l_neg, f_pos, f_gt, f_neg, neg_weights):
        check_inputs(f_pos, f_gt, f_neg, neg_weights)
        return f_pos.new_empty(f_pos.shape), f_gt.new_empty(f_gt.shape), f_neg.new_empty(f_neg.shape)

    torch.library.register_autograd("cpl_fast::cpr_distances", _backward, setup_context=_setup_context)


def _setup_context(ctx, inputs, output) -> None:
    f_pos, f_gt, f_neg, neg_weights = inputs
    ctx.save_for_backward(f_pos, f_gt, f_neg, neg_weights)


def _backward(ctx, grad_l_pos, grad_l_neg):
    f_pos, f_gt, f_neg, neg_weights = ctx.saved_tensors
    grad_pos, grad_gt, grad_neg = torch.ops.cpl_fast._cpr_distances_backward(
        grad_l_pos, grad_l_neg, f_pos, f_gt, f_neg, neg_weights)
    return grad_pos, grad_gt, grad_neg, None


if DISPATCHER.kernels.load_error is None:
    _register_compiled()

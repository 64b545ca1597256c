"""The gate of Restormer's feed-forward network, fused: ``gelu(x1) * x2`` for the channel halves of ``x``.

``x (B, 2C, ...)`` -> ``(B, C, ...)`` with the exact (erf) GELU, as ``F.gelu(x1) * x2`` after
``x.chunk(2, dim=1)``. The composite writes ``gelu(x1)`` and the product in the forward and, in the
backward, ``grad * x2``, the GELU gradient and the two halves concatenated into ``grad_x``; the fused
kernels read ``x`` once and write ``out`` (forward) and read ``grad`` and ``x`` once and write ``grad_x``
(backward, recomputing ``gelu(x1)``).

Backends: ``reference`` (:func:`cpl_fast.ops._reference.gated_gelu_reference`), ``cpu`` (C++; float32 and
bfloat16 use the erf approximation PyTorch's vectorised CPU GELU uses, float64 ``std::erf``), ``cuda`` (CUDA
C++, ``erf``/``erff``) and ``triton`` (``cpl_fast.kernels.gated_gelu``).
"""
from __future__ import annotations

import torch

from cpl_fast.ops._dispatch import CPU_DTYPES, GPU_DTYPES, kernel_dispatcher
from cpl_fast.ops._reference import gated_gelu_reference


def _validate(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gated_gelu: x must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"gated_gelu: x must be (B, 2C, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"gated_gelu: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] % 2:
        raise ValueError(f"gated_gelu: x must have an even number of channels (two halves), got shape "
                         f"{tuple(x.shape)}")


def _compiled(x):
    return torch.ops.cpl_fast.gated_gelu(x)


def _triton(x):
    return torch.ops.cpl_fast.gated_gelu_triton(x)


DISPATCHER = kernel_dispatcher(
    "gated_gelu", reference=gated_gelu_reference, compiled=_compiled, triton=_triton,
    triton_module="cpl_fast.kernels.gated_gelu", cpu_dtypes=CPU_DTYPES, gpu_dtypes=GPU_DTYPES)


def gated_gelu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``gelu(x1) * x2`` for ``x1, x2 = x.chunk(2, dim=1)`` (exact GELU): ``(B, 2C, ...)`` -> ``(B, C, ...)``.

    ``backend``: ``"auto"`` (or ``CPL_FAST_BACKEND``), ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    """
    _validate(x)
    return DISPATCHER(x, backend=backend, device=x.device)


def half_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0], x.shape[1] // 2) + tuple(x.shape[2:])


def setup_context(ctx, inputs, output) -> None:
    (x,) = inputs
    ctx.save_for_backward(x)


def make_backward(backward_op):
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return backward_op(grad_out.contiguous(), x)
    return backward


def register_fakes(forward_name: str, backward_name: str) -> None:
    @torch.library.register_fake(forward_name)
    def _forward_fake(x):
        return x.new_empty(half_shape(x))

    @torch.library.register_fake(backward_name)
    def _backward_fake(grad_out, x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def _register_compiled_ops() -> None:
    register_fakes("cpl_fast::gated_gelu", "cpl_fast::_gated_gelu_backward")
    torch.library.register_autograd("cpl_fast::gated_gelu",
                                    make_backward(torch.ops.cpl_fast._gated_gelu_backward),
                                    setup_context=setup_context)


if DISPATCHER.kernels.load_error is None:
    _register_compiled_ops()

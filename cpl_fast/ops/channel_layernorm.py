"""Layer norm over the channels of every pixel of an NCHW map, fused (Restormer's ``LayerNorm``).

``out = (x - mu) / sqrt(var + eps) * weight + bias`` with ``bias`` (``WithBias_LayerNorm``), or
``x / sqrt(var + eps) * weight`` without (``BiasFree_LayerNorm``); ``mu`` and the biased ``var`` are taken
over dim 1 of ``x (B, C, ...)``. The published code transposes to ``(B, HW, C)``, normalises the last
dimension and transposes back (two copies each way, and as many again in the backward); the kernels here
read the channels of each pixel where they are (strided by ``H * W``), so the forward reads ``x`` once and
writes ``out`` (plus one mean and one rstd per pixel), and the backward reads ``grad_out`` and ``x`` once
and writes ``grad_x`` (plus the ``C``-sized ``grad_weight`` and ``grad_bias``).

Backends: ``reference`` (:func:`cpl_fast.ops._reference.channel_layernorm_reference`), ``cpu`` (C++,
float32/float64/bfloat16, deterministic backward), ``cuda`` (CUDA C++) and ``triton``
(``cpl_fast.kernels.channel_layernorm``); the GPU backends take float16 too and reduce ``grad_weight``
without atomics. The compiled op ``cpl_fast::channel_layernorm`` gets its fake kernel and autograd here.
"""
from __future__ import annotations

import math

import torch

from cpl_fast.ops._dispatch import CPU_DTYPES, GPU_DTYPES, kernel_dispatcher
from cpl_fast.ops._reference import channel_layernorm_reference


def _validate(x, weight, bias, eps) -> None:
    """Check the arguments of :func:`channel_layernorm`. Raises TypeError/ValueError naming the problem."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("channel_layernorm: x and weight must be tensors")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"channel_layernorm: bias must be a tensor or None, got {type(bias).__name__}")
    if x.dim() < 2:
        raise ValueError(f"channel_layernorm: x must be (B, C, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"channel_layernorm: x must be a floating-point tensor, got {x.dtype}")
    channels = x.shape[1]
    if channels < 1:
        raise ValueError(f"channel_layernorm: x must have at least one channel, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (channels,):
            raise ValueError(f"channel_layernorm: {name} must be ({channels},) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"channel_layernorm: {name} must be floating-point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"channel_layernorm: {name} is on {t.device}, x on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"channel_layernorm: eps must be a finite number >= 0, got {eps!r}")


def _compiled(x, weight, bias, eps):
    return torch.ops.cpl_fast.channel_layernorm(x, weight, bias, eps)[0]


def _triton(x, weight, bias, eps):
    # The Triton kernels index weight and bias as dense vectors (the CUDA and CPU kernels copy a strided
    # one themselves); C values each, so the copy is free next to x.
    bias = None if bias is None else bias.contiguous()
    return torch.ops.cpl_fast.channel_layernorm_triton(x, weight.contiguous(), bias, eps)[0]


DISPATCHER = kernel_dispatcher(
    "channel_layernorm", reference=channel_layernorm_reference, compiled=_compiled, triton=_triton,
    triton_module="cpl_fast.kernels.channel_layernorm", cpu_dtypes=CPU_DTYPES, gpu_dtypes=GPU_DTYPES)


def channel_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """Layer norm over dim 1 of ``x (B, C, ...)`` at every pixel; ``bias=None`` is the bias-free norm.

    Differentiable in ``x``, ``weight`` and ``bias``. When ``weight``/``bias`` have another dtype than ``x``
    (a float32 parameter under autocast), all three are computed in the promoted dtype, which is the dtype
    the reference's arithmetic produces too. ``backend``: ``"auto"`` (or ``CPL_FAST_BACKEND``),
    ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    """
    _validate(x, weight, bias, eps)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return DISPATCHER(x, weight, bias, float(eps), backend=backend, device=x.device)


def _stat_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0],) + tuple(x.shape[2:])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def setup_context(ctx, inputs, output) -> None:
    """Shared by the compiled and the Triton op (same schema): keep x, weight and the statistics."""
    x, weight, bias, _eps = inputs
    _out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.with_bias = bias is not None
    ctx.save_for_backward(x, weight, mean, rstd)


def make_backward(backward_op):
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward_op(grad_out.contiguous(), x, weight, mean, rstd,
                                                     ctx.with_bias)
        return grad_x, grad_weight, (grad_bias if ctx.with_bias else None), None
    return backward


def register_fakes(forward_name: str, backward_name: str) -> None:
    @torch.library.register_fake(forward_name)
    def _forward_fake(x, weight, bias, eps):
        acc = _acc_dtype(x.dtype)
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                x.new_empty(_stat_shape(x), dtype=acc), x.new_empty(_stat_shape(x), dtype=acc))

    @torch.library.register_fake(backward_name)
    def _backward_fake(grad_out, x, weight, mean, rstd, with_bias):
        return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
                torch.empty_like(weight))


def _register_compiled_ops() -> None:
    register_fakes("cpl_fast::channel_layernorm", "cpl_fast::_channel_layernorm_backward")
    torch.library.register_autograd("cpl_fast::channel_layernorm",
                                    make_backward(torch.ops.cpl_fast._channel_layernorm_backward),
                                    setup_context=setup_context)


if DISPATCHER.kernels.load_error is None:
    _register_compiled_ops()

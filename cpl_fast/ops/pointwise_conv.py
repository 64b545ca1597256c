"""The 1x1 convolution as a batched matrix product over the channels: ``out[b] = W @ x[b] + bias``.

For ``x (B, C, H, W)`` and ``weight (O, C, 1, 1)``: ``torch.bmm`` of ``weight.view(1, O, C)`` expanded to
the batch (a view, no copy) and ``x.view(B, C, H*W)``, autograd from ``bmm`` (``grad_x = W^T @ grad`` per
sample, ``grad_W = sum_b grad[b] @ x[b]^T``). ``torch.matmul`` of the 2-D weight and the 3-D input is the
same maths but measured slower here (it folds the batch into a copy). Same maths as ``F.conv2d(x, weight,
bias)``. On the CPU PyTorch sends a 1x1 convolution with a batch below 16 on one thread to its slow path
(``_slow_conv2d_forward``/``_backward``, a GEMM per sample); the batched GEMM replaces it there; on an idle
core it measured 0.95-1.04x the speed of ``F.conv2d`` at the model's shapes (within the noise: no gain to
claim) and up to 1.1x in isolated runs (bench/results/pointwise_conv_cpu-1threads.md). Everywhere else
``F.conv2d`` runs: on two CPU threads oneDNN's 1x1 convolution was measured 1.4-1.6x faster than this GEMM
(bench/results/pointwise_conv_cpu.md), cuDNN's is a GEMM already, and under torch.compile the compiler
lowers the convolution itself (the thread count is not traceable). ``backend="reference"`` or
``CPL_FAST_BACKEND=reference`` takes ``F.conv2d`` everywhere; the other backend names do not apply to this
op (it has no kernel of its own) and leave the choice as described.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cpl_fast.ops._dispatch import requested_backend


def _validate(x, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("pointwise_conv: x and weight must be tensors")
    if x.dim() != 4:
        raise ValueError(f"pointwise_conv: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"pointwise_conv: weight must be (O, {x.shape[1]}, 1, 1) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"pointwise_conv: bias must be None or ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    autocast = torch.is_autocast_enabled(x.device.type)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"pointwise_conv: {name} is on {t.device}, x on {x.device}")
        if t.dtype != x.dtype and not autocast:
            raise ValueError(f"pointwise_conv: {name} dtype {t.dtype} differs from x dtype {x.dtype}")


def pointwise_conv_gemm(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight``, as one batched GEMM (no checks, any device)."""
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    w = weight.view(1, out_channels, channels).expand(batch, out_channels, channels)
    out = torch.bmm(w, x.reshape(batch, channels, height * width))
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1)
    return out.view(batch, weight.shape[0], height, width)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for ``weight (O, C, 1, 1)``: the GEMM where PyTorch's CPU convolution
    takes its slow path (one thread, batch below 16), else ``F.conv2d`` (module docstring)."""
    _validate(x, weight, bias)
    # Read like the other ops' backend names (and rejected alike when unknown); only "reference" changes
    # the choice, as this op has no kernels of its own.
    if requested_backend(backend) == "reference" or not takes_gemm(x):
        return F.conv2d(x, weight, bias)
    return pointwise_conv_gemm(x, weight, bias)


def takes_gemm(x: torch.Tensor) -> bool:
    """Whether :func:`pointwise_conv` computes ``x`` with the GEMM (PyTorch's slow-path condition)."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.shape[0] >= 16:
        return False
    return torch.get_num_threads() == 1

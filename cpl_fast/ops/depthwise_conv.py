"""The 3x3 depthwise convolution of Restormer's blocks (``qkv_dwconv``, the FFN's ``dwconv``), on NCHW maps.

``F.conv2d(x, weight, padding=1, groups=C)`` for ``x (B, C, H, W)`` and ``weight (C, 1, 3, 3)``: stride 1, no
bias. On the CPU, PyTorch sends it to oneDNN, whose NCHW depthwise convolution was measured at 3-7 GFLOP/s
forward and slower still backward at the model's shapes (a one-thread step of the ``cpl`` model spent a
quarter of its time there; bench/results/depthwise_conv3x3_cpu-1threads.md). The C++ kernels compute each
(b, c) plane on its own: row by row when it is at least 32 wide, else as one flat loop with the wrapped column
neighbours masked; the backward produces ``grad_x`` and that plane's share of ``grad_weight`` in one pass over
``grad_out`` and ``x``, per channel, so without atomics.

Backends: ``reference`` (:func:`cpl_fast.ops._reference.depthwise_conv3x3_reference`) and ``cpu`` (C++,
float32/float64/bfloat16). On a GPU the reference runs (cuDNN's depthwise convolution; this op has no CUDA or
Triton kernel, the dispatcher says so), and under autocast too, so that the convolution's autocast dtype
rules are PyTorch's own.
"""
from __future__ import annotations

import torch

from cpl_fast.ops._dispatch import CPU_DTYPES, Backend, CompiledKernels, Dispatcher, dtype_reasons
from cpl_fast.ops._reference import depthwise_conv3x3_reference


def _validate(x, weight) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("depthwise_conv3x3: x and weight must be tensors")
    if x.dim() != 4:
        raise ValueError(f"depthwise_conv3x3: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"depthwise_conv3x3: x must be a floating-point tensor, got {x.dtype}")
    if tuple(weight.shape) != (x.shape[1], 1, 3, 3):
        raise ValueError(f"depthwise_conv3x3: weight must be ({x.shape[1]}, 1, 3, 3) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"depthwise_conv3x3: weight is on {weight.device}, x on {x.device}")
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"depthwise_conv3x3: weight dtype {weight.dtype} differs from x dtype {x.dtype}")


def _compiled(x, weight):
    return torch.ops.cpl_fast.depthwise_conv3x3(x, weight)


def _no_kernel(name: str):
    return lambda device: [f"depthwise_conv3x3 has no {name} kernel: on a GPU the reference (cuDNN) runs"]


KERNELS = CompiledKernels("depthwise_conv3x3")
DISPATCHER = Dispatcher(
    op="depthwise_conv3x3",
    backends={
        "reference": Backend("reference", depthwise_conv3x3_reference, available=lambda device: []),
        "cpu": Backend("cpu", _compiled, available=KERNELS.reasons("cpu"),
                       supports=dtype_reasons(CPU_DTYPES, "cpu")),
        "cuda": Backend("cuda", _compiled, available=_no_kernel("CUDA")),
        "triton": Backend("triton", _compiled, available=_no_kernel("Triton")),
    },
    priority={"cpu": ("cpu", "reference"), "cuda": ("reference",)},
    kernels=KERNELS,
)


def depthwise_conv3x3(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1, groups=C)`` for ``x (B, C, H, W)``, ``weight (C, 1, 3, 3)``.

    Differentiable in both. ``backend``: ``"auto"`` (or ``CPL_FAST_BACKEND``), ``"reference"`` or ``"cpu"``;
    under autocast the reference runs whatever is asked.
    """
    _validate(x, weight)
    if torch.is_autocast_enabled(x.device.type):
        return depthwise_conv3x3_reference(x, weight)
    return DISPATCHER(x, weight, backend=backend, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    return tuple(torch.ops.cpl_fast._depthwise_conv3x3_backward(grad_out.contiguous(), x, weight))


def _register_compiled_ops() -> None:
    @torch.library.register_fake("cpl_fast::depthwise_conv3x3")
    def _forward_fake(x, weight):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cpl_fast::_depthwise_conv3x3_backward")
    def _backward_fake(grad_out, x, weight):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(weight, memory_format=torch.contiguous_format))

    torch.library.register_autograd("cpl_fast::depthwise_conv3x3", _backward, setup_context=_setup_context)


if KERNELS.load_error is None:
    _register_compiled_ops()

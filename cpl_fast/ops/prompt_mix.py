"""Sparse prompt mix: ``out[b] = sum_j weights[b, j] * bilinear(bank[indices[b, j]], size)``.

One entry point, :func:`prompt_mix`, and four backends:

* ``reference``: the plain-PyTorch oracle (:func:`cpl_fast.ops._reference.prompt_mix_reference`).
* ``cpu``: the C++ kernels of ``cpl_fast._C`` (``torch.ops.cpl_fast.prompt_mix``), float32, float64
  and bfloat16; the backward is deterministic.
* ``cuda``: the CUDA kernels of ``cpl_fast._C`` (built only with a CUDA toolchain); its ``grad_bank``
  is accumulated with atomics.
* ``triton``: ``cpl_fast.kernels.prompt_mix`` (``torch.ops.cpl_fast.prompt_mix_triton``); its
  ``grad_bank`` is accumulated with atomics too.

The compiled ops get their fake kernels and autograd here, so they work under ``torch.compile``
and ``torch.export``; the Triton op registers its own in ``cpl_fast.kernels.prompt_mix``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from cpl_fast.ops._dispatch import CPU_DTYPES, GPU_DTYPES, kernel_dispatcher
from cpl_fast.ops._reference import prompt_mix_reference


def _validate(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
              size: Sequence[int]) -> tuple[int, int]:
    """Check the arguments of :func:`prompt_mix`; return ``(H, W)``. Raises ValueError/TypeError."""
    if not all(isinstance(t, torch.Tensor) for t in (bank, indices, weights)):
        raise TypeError("prompt_mix: bank, indices and weights must be tensors")
    if bank.dim() != 4:
        raise ValueError(f"prompt_mix: bank must be 4-D (n, C, S, S'), got shape {tuple(bank.shape)}")
    if not bank.is_floating_point():
        raise ValueError(f"prompt_mix: bank must be a floating-point tensor, got {bank.dtype}")
    if bank.shape[2] < 1 or bank.shape[3] < 1:
        raise ValueError(f"prompt_mix: bank's spatial size must be >= 1, got shape {tuple(bank.shape)}")
    if indices.dim() != 2 or indices.dtype != torch.int64:
        raise ValueError(f"prompt_mix: indices must be a (B, k) int64 tensor, got shape {tuple(indices.shape)} "
                         f"and dtype {indices.dtype}")
    if tuple(weights.shape) != tuple(indices.shape):
        raise ValueError(f"prompt_mix: weights shape {tuple(weights.shape)} != indices shape {tuple(indices.shape)}")
    if weights.dtype != bank.dtype:
        raise ValueError(f"prompt_mix: weights dtype {weights.dtype} differs from bank dtype {bank.dtype}")
    if indices.device != bank.device or weights.device != bank.device:
        raise ValueError(f"prompt_mix: bank ({bank.device}), indices ({indices.device}) and weights "
                         f"({weights.device}) must be on one device")
    n, k = bank.shape[0], indices.shape[1]
    if k < 1:
        raise ValueError("prompt_mix: indices must select at least one expert (k >= 1)")
    if k > n:
        raise ValueError(f"prompt_mix: k = {k} experts per sample but the bank has only n = {n}")
    if len(size) != 2:
        raise ValueError(f"prompt_mix: size must be (H, W), got {tuple(size)}")
    height, width = size
    if not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in (height, width)):
        raise TypeError(f"prompt_mix: size must be two ints, got {tuple(size)}")
    if height < 1 or width < 1:
        raise ValueError(f"prompt_mix: size must be positive, got ({height}, {width})")
    # The range check reads the indices' values: done on the CPU only (on CUDA it would synchronise
    # the device; the CUDA kernels trap on a bad index instead) and not while torch.compile traces
    # (the compiled kernels check it themselves).
    if bank.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= n:
            raise ValueError(f"prompt_mix: index {low if low < 0 else high} out of range [0, {n})")
    return height, width


def _compiled(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
              size: tuple[int, int]) -> torch.Tensor:
    return torch.ops.cpl_fast.prompt_mix(bank, indices, weights, size[0], size[1])


def _triton(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            size: tuple[int, int]) -> torch.Tensor:
    return torch.ops.cpl_fast.prompt_mix_triton(bank, indices, weights, size[0], size[1])


DISPATCHER = kernel_dispatcher(
    "prompt_mix", reference=prompt_mix_reference, compiled=_compiled, triton=_triton,
    triton_module="cpl_fast.kernels.prompt_mix", cpu_dtypes=CPU_DTYPES, gpu_dtypes=GPU_DTYPES,
    atomic_backward=("cuda", "triton"))


def prompt_mix(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, size: Sequence[int],
               backend: str = "auto") -> torch.Tensor:
    """Mix the ``k`` selected experts of each sample and resize them bilinearly to ``size = (H, W)``.

    ``out[b, c] = sum_j weights[b, j] * bilinear(bank[indices[b, j], c], (H, W))`` with
    ``F.interpolate(mode="bilinear", align_corners=False)``'s rule, for up- and down-sampling.
    bank ``(n, C, S, S')``; indices ``(B, k)`` int64 in ``[0, n)``; weights ``(B, k)`` of the bank's
    dtype -> ``(B, C, H, W)``. Differentiable in bank and weights. ``backend``: ``"auto"`` (or the
    ``CPL_FAST_BACKEND`` variable), ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    """
    height, width = _validate(bank, indices, weights, size)
    return DISPATCHER(bank, indices, weights, (height, width), backend=backend, device=bank.device)


def _register_compiled_ops() -> None:
    """Fake kernels and autograd of ``cpl_fast::prompt_mix`` (schemas and kernels come from _C)."""

    @torch.library.register_fake("cpl_fast::prompt_mix")
    def _prompt_mix_fake(bank, indices, weights, height, width):
        return bank.new_empty((indices.shape[0], bank.shape[1], height, width))

    @torch.library.register_fake("cpl_fast::_prompt_mix_backward")
    def _prompt_mix_backward_fake(grad_out, bank, indices, weights):
        return torch.empty_like(bank, memory_format=torch.contiguous_format), weights.new_empty(indices.shape)

    def setup_context(ctx, inputs, output) -> None:
        bank, indices, weights, _height, _width = inputs
        ctx.save_for_backward(bank, indices, weights)

    def backward(ctx, grad_out):
        bank, indices, weights = ctx.saved_tensors
        grad_bank, grad_weights = torch.ops.cpl_fast._prompt_mix_backward(grad_out, bank, indices, weights)
        return grad_bank, None, grad_weights, None, None

    torch.library.register_autograd("cpl_fast::prompt_mix", backward, setup_context=setup_context)


if DISPATCHER.kernels.load_error is None:
    _register_compiled_ops()

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

from cpl_fast import _extension
from cpl_fast.ops._dispatch import Backend, Dispatcher, triton_reasons
from cpl_fast.ops._reference import prompt_mix_reference

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


# Read once at import (the import registers the ops anyway), so that the dispatch decision is made of
# constants that torch.compile can trace through.
_LOAD_ERROR = _extension.load_error()
_HAS_KERNEL = {key: _extension.has_kernel("prompt_mix", key) for key in ("CPU", "CUDA")}


def _compiled_reasons(dispatch_key: str, device_type: str, device: torch.device) -> list[str]:
    """Why ``cpl_fast._C``'s ``dispatch_key`` kernel of prompt_mix cannot run on ``device``."""
    reasons = []
    if device.type != device_type:
        reasons.append(f"it runs on {device_type} tensors, not {device.type}")
    if _LOAD_ERROR is not None:
        reasons.append(_LOAD_ERROR)
    elif not _HAS_KERNEL[dispatch_key]:
        reasons.append(f"cpl_fast._C was built without a {dispatch_key} kernel of prompt_mix")
    return reasons


def _dtype_reasons(dtypes: tuple[torch.dtype, ...], name: str):
    def supports(bank: torch.Tensor, *_args) -> list[str]:
        if bank.dtype in dtypes:
            return []
        return [f"the {name} backend takes {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                f"not {str(bank.dtype).removeprefix('torch.')}"]
    return supports


def _compiled(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
              size: tuple[int, int]) -> torch.Tensor:
    return torch.ops.cpl_fast.prompt_mix(bank, indices, weights, size[0], size[1])


_TRITON_IMPORT: list[str | None] = []    # filled on first use: None, or why the kernels did not import


def _triton_available(device: torch.device) -> list[str]:
    reasons = triton_reasons(device)
    if reasons:
        return reasons
    if not _TRITON_IMPORT:     # imported lazily: triton is slow to import and optional
        try:
            import cpl_fast.kernels.prompt_mix  # noqa: F401  (registers cpl_fast::prompt_mix_triton)
            _TRITON_IMPORT.append(None)
        except ImportError as exc:
            _TRITON_IMPORT.append(f"cpl_fast.kernels.prompt_mix failed to import: {exc}")
    return [_TRITON_IMPORT[0]] if _TRITON_IMPORT[0] is not None else []


def _triton(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            size: tuple[int, int]) -> torch.Tensor:
    return torch.ops.cpl_fast.prompt_mix_triton(bank, indices, weights, size[0], size[1])


DISPATCHER = Dispatcher(
    op="prompt_mix",
    backends={
        "reference": Backend("reference", prompt_mix_reference, available=lambda device: []),
        "cpu": Backend("cpu", _compiled, available=lambda device: _compiled_reasons("CPU", "cpu", device),
                       supports=_dtype_reasons(_CPU_DTYPES, "cpu")),
        "cuda": Backend("cuda", _compiled, available=lambda device: _compiled_reasons("CUDA", "cuda", device),
                        supports=_dtype_reasons(_GPU_DTYPES, "cuda"), atomic_backward=True),
        "triton": Backend("triton", _triton, available=_triton_available,
                          supports=_dtype_reasons(_GPU_DTYPES, "triton"), atomic_backward=True),
    },
    priority={"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
)


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


if _LOAD_ERROR is None:
    _register_compiled_ops()

"""cpl_fast.ops.gated_gelu: the shared op tests (tests/op_harness.py) and the op's own.

The Triton kernels run on a CUDA device when there is one; on the CPU they run under ``TRITON_INTERPRET=1``
in a child process (``test_interpreted_kernels_in_subprocess``), and the Triton cases of this process skip.
"""
from __future__ import annotations

import pytest
import torch
from op_harness import INTERPRETED, TOL, Inputs, KernelOpTester, backend_or_skip

from cpl_fast.ops import gated_gelu, gated_gelu_reference
from cpl_fast.ops.gated_gelu import DISPATCHER

SHAPES = {  # x (B, 2C, ...): odd C, H = 1, W = 1, one pixel, 3-D and 2-D inputs, long runs across threads
    "c37": (2, 74, 5, 7),
    "c1": (3, 2, 4, 3),
    "h1": (2, 10, 1, 9),
    "w1": (2, 6, 8, 1),
    "pixel": (1, 2, 1, 1),
    "3d": (2, 8, 13),
    "2d": (5, 6),
    "long": (2, 18, 41, 47),
}


def make_x(shape, dtype, device="cpu"):
    """Spread over the GELU's curved part and its tails (|x| up to ~10)."""
    return torch.randn(shape, dtype=dtype, device=device) * 3


def run_with_grads(fn, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(grad_out)
    return out.detach(), x.grad


def half(shape):
    return (shape[0], shape[1] // 2) + tuple(shape[2:])


def _non_contiguous(dtype, device):
    grad_out = torch.randn(2, 5, 7, 10, dtype=torch.float64, device=device)[..., 1::2]
    return Inputs([make_x((3, 12, 7, 10), dtype, device)], lambda x: (x[1:, 1:11, :, ::2],), [grad_out])


class TestGatedGelu(KernelOpTester):
    fn = gated_gelu
    reference = gated_gelu_reference
    dispatcher = DISPATCHER
    cases = {**SHAPES, "lowprec": (2, 26, 5, 9)}
    low_precision_cases = ("lowprec",)
    non_contiguous_cases = {"strided": _non_contiguous}
    gradcheck_cases = {"small": (2, 6, 3, 4)}
    dispatch_case = (2, 4, 3)

    def reference_cases(self):
        return [c for c in super().reference_cases() if c[0] != "lowprec"]

    def make_inputs(self, case, dtype, device):
        if callable(case):
            return case(dtype, device)
        grad_out = torch.randn(half(case), dtype=torch.float64, device=device)
        return Inputs([make_x(case, dtype, device)], lambda x: (x,), [grad_out])

    def names(self, inputs):
        return ["out", "grad_x"]

    def opcheck_calls(self, backend, device, variant):
        x = make_x((2, 6, 3, 4), torch.float64, device).requires_grad_(True)
        if backend == "triton":
            return [(torch.ops.cpl_fast.gated_gelu_triton.default, (x,))]
        grad_out = torch.randn(2, 3, 3, 4, dtype=torch.float64, device=device)
        return [(torch.ops.cpl_fast.gated_gelu.default, (x,)),
                (torch.ops.cpl_fast._gated_gelu_backward.default, (grad_out, x.detach()))]

    def bad_inputs(self):
        return {
            "1d": ((torch.randn(4),), {}, ValueError, r"x must be \(B, 2C, ...\)"),
            "odd": ((torch.randn(2, 3, 4),), {}, ValueError, "even number of channels"),
            "int": ((torch.randint(0, 3, (2, 4, 3)),), {}, ValueError, "floating-point"),
            "list": (([1.0, 2.0],), {}, TypeError, "must be a tensor"),
        }


def test_extreme_values():
    """Large |x| (the exponential underflows) as F.gelu; NaN propagates. (Infinities are left out: PyTorch's
    own vectorised float32 GELU returns NaN for +inf.)"""
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    a = torch.tensor([-1e4, -40.0, -9.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 9.0, 40.0, 1e4])
    for dtype in (torch.float32, torch.float64):
        x = torch.stack([a, torch.full_like(a, 0.5)]).to(dtype).view(1, 2, -1)
        torch.testing.assert_close(gated_gelu(x, backend="cpu"), gated_gelu_reference(x), equal_nan=True,
                                   **TOL[dtype])
        nan = torch.tensor([[[float("nan")], [1.0]]], dtype=dtype)
        assert torch.isnan(gated_gelu(nan, backend="cpu")).all()


def test_float32_kernel_is_as_close_to_float64_as_pytorch():
    """The CPU float32 erf approximation: no further from the float64 truth than PyTorch's float32 GELU."""
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    x = make_x((4, 64, 32, 32), torch.float32)
    grad_out = torch.randn(4, 32, 32, 32)
    truth = run_with_grads(gated_gelu_reference, x.double(), grad_out.double())
    torch32 = run_with_grads(gated_gelu_reference, x, grad_out)
    kernel = run_with_grads(lambda t: gated_gelu(t, backend="cpu"), x, grad_out)
    for got, ref, want in zip(kernel, torch32, truth):
        err, ref_err = (got.double() - want).abs().max().item(), (ref.double() - want).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


def test_compiled_op_checks_its_arguments():
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    with pytest.raises(RuntimeError, match="even number of channels"):
        torch.ops.cpl_fast.gated_gelu(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match=r"grad_out must be \(B, C, ...\)"):
        torch.ops.cpl_fast._gated_gelu_backward(torch.randn(2, 4, 4), torch.randn(2, 4, 4))


# --- Triton --------------------------------------------------------------------------------------

def test_triton_kernels_compile_for_sm90():
    if INTERPRETED:
        pytest.skip("compiles for the GPU: runs in the parent process, not under TRITON_INTERPRET=1")
    from cpl_fast.kernels import gated_gelu as kernels
    from triton_aot import compile_for_sm90

    for kernel in (kernels._gated_gelu_fwd_kernel, kernels._gated_gelu_bwd_kernel):
        compile_for_sm90(kernel, {}, constexprs={"USE_FP64": False, "BLOCK": 1024})

"""cpl_fast.ops.depthwise_conv3x3: the shared op tests (tests/op_harness.py) and the op's own.

The op has a C++ CPU kernel only (on a GPU the reference runs): the harness's cases run the ``cpu`` backend,
and the dispatch tests check that the GPU backends say they do not exist.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_harness import Inputs, KernelOpTester, backend_or_skip

from cpl_fast.ops import depthwise_conv3x3, depthwise_conv3x3_reference
from cpl_fast.ops.depthwise_conv import DISPATCHER

SHAPES = {  # x (B, C, H, W): both kernel paths (rows for W >= 32, the padded copy below), odd C, H = 1, W = 1
    "c37": (2, 37, 5, 7),
    "c1": (3, 1, 4, 3),
    "h1": (2, 5, 1, 9),
    "w1": (2, 6, 8, 1),
    "w2": (1, 3, 6, 2),
    "pixel": (1, 2, 1, 1),
    "wide": (2, 3, 5, 41),
    "wide_h1": (1, 2, 1, 33),
    "row_w32": (1, 4, 9, 32),
    "many": (2, 19, 13, 11),
}


def _inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    weight = torch.randn(shape[1], 1, 3, 3, dtype=dtype, device=device)
    return Inputs([x, weight], lambda x, w: (x, w), [torch.randn(shape, dtype=torch.float64, device=device)])


def _non_contiguous(dtype, device):
    x = torch.randn(3, 10, 7, 40, dtype=dtype, device=device)
    weight = torch.randn(3, 5, 3, 3, dtype=dtype, device=device)
    grad = torch.randn(2, 5, 7, 20, dtype=torch.float64, device=device)
    return Inputs([x, weight], lambda x, w: (x[1:, ::2, :, ::2], w[1, :, None]), [grad])


def _channels_last(dtype, device):
    x = torch.randn(2, 6, 5, 34, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 1, 3, 3, dtype=dtype, device=device)
    return Inputs([x, weight], lambda x, w: (x, w), [torch.randn(2, 6, 5, 34, dtype=torch.float64)])


class TestDepthwiseConv3x3(KernelOpTester):
    fn = depthwise_conv3x3
    reference = depthwise_conv3x3_reference
    dispatcher = DISPATCHER
    backends = (("cpu", "cpu"),)
    cases = {**SHAPES, "lowprec": (2, 7, 6, 35)}
    low_precision_cases = ("lowprec",)
    non_contiguous_cases = {"strided": _non_contiguous, "channels_last": _channels_last}
    gradcheck_cases = {"small": (2, 3, 4, 5), "w1": (1, 2, 3, 1), "wide": (1, 2, 3, 33)}
    dispatch_case = (2, 3, 4, 5)
    test_auto_needs_torch_library_triton_op = None      # no Triton kernels
    test_interpreted_kernels_in_subprocess = None

    def reference_cases(self):
        return [c for c in super().reference_cases() if c[0] != "lowprec"]

    def make_inputs(self, case, dtype, device):
        return case(dtype, device) if callable(case) else _inputs(case, dtype, device)

    def names(self, inputs):
        return ["out", "grad_x", "grad_weight"]

    def opcheck_calls(self, backend, device, variant):
        x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
        weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
        grad = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
        return [(torch.ops.cpl_fast.depthwise_conv3x3.default, (x, weight)),
                (torch.ops.cpl_fast._depthwise_conv3x3_backward.default, (grad, x.detach(), weight.detach()))]

    def test_low_precision_error_budget(self, backend, device, dtype, case):
        if backend != "cpu":
            pytest.skip("the op has CPU kernels only")
        super().test_low_precision_error_budget(backend, device, dtype, case)

    def test_forced_unavailable_backend_raises_with_reasons(self, monkeypatch):
        args = self.dispatch_args()
        with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this call: .*no CUDA kernel"):
            depthwise_conv3x3(*args, backend="cuda")
        with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run this call: .*no Triton kernel"):
            depthwise_conv3x3(*args, backend="triton")
        if self.dispatcher.kernels.load_error is None:
            takes = "the cpu backend takes float32, float64, bfloat16, not float16"
            with pytest.raises(RuntimeError, match=takes):
                depthwise_conv3x3(*self.dispatch_args(torch.float16), backend="cpu")

    def bad_inputs(self):
        x = torch.randn(2, 4, 5, 5)
        shape = r"weight must be \(4, 1, 3, 3\)"
        return {
            "3d": ((torch.randn(4, 5, 5), torch.randn(4, 1, 3, 3)), {}, ValueError,
                   r"x must be \(B, C, H, W\)"),
            "weight_channels": ((x, torch.randn(3, 1, 3, 3)), {}, ValueError, shape),
            "weight_5x5": ((x, torch.randn(4, 1, 5, 5)), {}, ValueError, shape),
            "dtype": ((x, torch.randn(4, 1, 3, 3, dtype=torch.float64)), {}, ValueError, "dtype"),
            "int": ((x.long(), torch.randn(4, 1, 3, 3)), {}, ValueError, "floating-point"),
            "list": (([1.0], torch.randn(4, 1, 3, 3)), {}, TypeError, "must be tensors"),
        }


def test_float32_weight_gradient_of_a_large_map_is_accurate():
    """grad_weight sums B H W products per tap: against the float64 truth, no worse than PyTorch's float32."""
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    x = torch.randn(2, 3, 128, 96) + 0.5            # a mean, so the sums do not cancel to nothing
    weight = torch.randn(3, 1, 3, 3)
    grad = torch.randn(2, 3, 128, 96) + 0.5
    w64 = weight.double().requires_grad_()
    (want,) = torch.autograd.grad(depthwise_conv3x3_reference(x.double(), w64), w64, grad.double())
    w32 = weight.clone().requires_grad_()
    (torch32,) = torch.autograd.grad(depthwise_conv3x3_reference(x, w32), w32, grad)
    wk = weight.clone().requires_grad_()
    (got,) = torch.autograd.grad(depthwise_conv3x3(x, wk, backend="cpu"), wk, grad)
    err, ref_err = (got.double() - want).abs().max().item(), (torch32.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * want.abs().max().item(), (err, ref_err)


def test_compiled_op_checks_its_arguments():
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    with pytest.raises(RuntimeError, match=r"weight must be \(4, 1, 3, 3\)"):
        torch.ops.cpl_fast.depthwise_conv3x3(torch.randn(1, 4, 3, 3), torch.randn(4, 1, 2, 2))
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        torch.ops.cpl_fast._depthwise_conv3x3_backward(torch.randn(1, 4, 3, 2), torch.randn(1, 4, 3, 3),
                                                        torch.randn(4, 1, 3, 3))


def test_autocast_takes_the_reference():
    """Under CPU autocast the convolution is PyTorch's own (its autocast dtype rules), float32 weight too."""
    x = torch.randn(1, 4, 6, 6)
    weight = torch.randn(4, 1, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = depthwise_conv3x3(x.bfloat16(), weight)
        want = F.conv2d(x.bfloat16(), weight, padding=1, groups=4)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backward_is_deterministic():
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    x = torch.randn(2, 16, 20, 40, requires_grad=True)
    weight = torch.randn(16, 1, 3, 3, requires_grad=True)
    grad = torch.randn(2, 16, 20, 40)
    first = torch.autograd.grad(depthwise_conv3x3(x, weight, backend="cpu"), (x, weight), grad)
    second = torch.autograd.grad(depthwise_conv3x3(x, weight, backend="cpu"), (x, weight), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("width", [8, 40])          # the flat (masked) and the row paths
def test_non_finite_values_stay_in_their_neighbourhood(width):
    """An infinity in a border column reaches only the outputs (and taps) the convolution gives it, as in
    F.conv2d: the flat path's wrapped neighbours are masked, not multiplied by zero."""
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    x = torch.randn(1, 2, 6, width, dtype=torch.float64)
    x[0, 0, 2, width - 1] = float("inf")
    x[0, 1, 3, 0] = float("-inf")
    weight = torch.rand(2, 1, 3, 3, dtype=torch.float64) + 0.1
    grad = torch.randn(1, 2, 6, width, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    got = [depthwise_conv3x3(*leaves, backend="cpu"), *torch.autograd.grad(
        depthwise_conv3x3(*leaves, backend="cpu"), leaves, grad)]
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    want = [depthwise_conv3x3_reference(*leaves), *torch.autograd.grad(
        depthwise_conv3x3_reference(*leaves), leaves, grad)]
    assert torch.isfinite(want[0][0, 0, 3, 0]) and torch.isfinite(want[0][0, 1, 2, width - 1])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-12, atol=1e-12)

"""cpl_fast.ops.gated_gelu: every backend against the reference, gradients, registration, dispatch.

The Triton kernels run on a CUDA device when there is one; on the CPU they run under ``TRITON_INTERPRET=1``
in a child process (``test_interpreted_kernels_in_subprocess``), and the Triton cases of this process skip.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from op_backends import (
    BACKEND_IDS,
    BACKENDS,
    HAS_CUDA,
    INTERPRETED,
    LOW_PRECISION,
    TOL,
    backend_or_skip,
    low_precision_check,
    run_interpreted,
)

import cpl_fast.ops
from cpl_fast import _extension
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


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(backend, device, dtype, shape):
    backend_or_skip(DISPATCHER, backend, device)
    x = make_x(shape, dtype, device)
    grad_out = torch.randn(half(shape), dtype=dtype, device=device)
    expected = run_with_grads(gated_gelu_reference, x, grad_out)
    actual = run_with_grads(lambda t: gated_gelu(t, backend=backend), x, grad_out)
    for name, got, want in zip(("out", "grad_x"), actual, expected):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


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


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_non_contiguous_inputs(backend, device):
    backend_or_skip(DISPATCHER, backend, device)
    dtype = torch.float64
    x = make_x((3, 12, 7, 10), dtype, device)[1:, 1:11, :, ::2]     # (2, 10, 7, 5), strided
    grad_out = torch.randn(2, 5, 7, 10, dtype=dtype, device=device)[..., 1::2]
    assert not (x.is_contiguous() or grad_out.is_contiguous())
    expected = run_with_grads(gated_gelu_reference, x, grad_out)
    actual = run_with_grads(lambda t: gated_gelu(t, backend=backend), x, grad_out)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", LOW_PRECISION, ids=lambda v: str(v).removeprefix("torch."))
def test_low_precision_error_budget(backend, device, dtype):
    backend_or_skip(DISPATCHER, backend, device)
    x = make_x((2, 26, 5, 9), dtype, device)
    grad_out = torch.randn(2, 13, 5, 9, device=device).to(dtype)
    low_precision_check(gated_gelu_reference, lambda t: gated_gelu(t, backend=backend), [x], grad_out, dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend):
    if backend != "reference":
        backend_or_skip(DISPATCHER, backend, "cpu")
    x = make_x((2, 6, 3, 4), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: gated_gelu(t, backend=backend), (x,))


def test_opcheck_registered_ops():
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    x = make_x((2, 6, 3, 4), torch.float64).requires_grad_(True)
    torch.library.opcheck(torch.ops.cpl_fast.gated_gelu.default, (x,))
    grad_out = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.cpl_fast._gated_gelu_backward.default, (grad_out, x.detach()))


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


# --- dispatch --------------------------------------------------------------------------------------

def test_auto_picks_cpu_backend_on_cpu():
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    x = make_x((2, 4, 3), torch.float32)
    assert DISPATCHER.select(x, device=x.device).name == "cpu"


def test_forced_backends(monkeypatch):
    x = make_x((2, 4, 3), torch.float64)
    with pytest.raises(RuntimeError, match=r"backend .cuda. cannot run this call: .*tensors, not cpu"):
        gated_gelu(x, backend="cuda")
    if not INTERPRETED and not HAS_CUDA:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            gated_gelu(x, backend="triton")
    monkeypatch.setenv("CPL_FAST_BACKEND", "reference")
    torch.testing.assert_close(gated_gelu(x), gated_gelu_reference(x), rtol=0, atol=0)


def test_auto_falls_back_to_reference_for_float16_and_says_so(caplog):
    backend_or_skip(DISPATCHER, "cpu", "cpu")
    x = make_x((2, 4, 3), torch.float16)
    DISPATCHER._announced.discard(("reference", "cpu"))
    with caplog.at_level(logging.WARNING, logger="cpl_fast"):
        out = gated_gelu(x)
    assert "uses the 'reference' backend" in caplog.text and "float16" in caplog.text
    torch.testing.assert_close(out, F.gelu(x[:, :2]) * x[:, 2:])


def test_available_backends_reports_the_op():
    report = cpl_fast.ops.available_backends("cpu")["gated_gelu"]
    assert report["reference"] == [] and report["cuda"]
    assert (report["cpu"] == []) == (_extension.load_error() is None)


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(4), ValueError, r"x must be \(B, 2C, ...\)"),
    (torch.randn(2, 3, 4), ValueError, "even number of channels"),
    (torch.randint(0, 3, (2, 4, 3)), ValueError, "floating-point"),
    ([1.0, 2.0], TypeError, "must be a tensor"),
], ids=["1d", "odd", "int", "list"])
def test_bad_inputs(x, error, match):
    with pytest.raises(error, match=match):
        gated_gelu(x)


# --- Triton --------------------------------------------------------------------------------------

def test_triton_opcheck():
    device = "cuda" if HAS_CUDA else "cpu"
    backend_or_skip(DISPATCHER, "triton", device)
    x = make_x((2, 6, 3, 4), torch.float64, device).requires_grad_(True)
    utils = ("test_schema", "test_autograd_registration") if device == "cpu" else None
    torch.library.opcheck(torch.ops.cpl_fast.gated_gelu_triton.default, (x,),
                          test_utils=utils or torch.library._OPCHECK_DEFAULT_UTILS)


def test_triton_kernels_compile_for_sm90():
    if INTERPRETED:
        pytest.skip("compiles for the GPU: runs in the parent process, not under TRITON_INTERPRET=1")
    from cpl_fast.kernels import gated_gelu as kernels
    from triton_aot import compile_for_sm90

    for kernel in (kernels._gated_gelu_fwd_kernel, kernels._gated_gelu_bwd_kernel):
        compile_for_sm90(kernel, {}, constexprs={"USE_FP64": False, "BLOCK": 1024})


def test_interpreted_kernels_in_subprocess():
    run_interpreted(__file__)

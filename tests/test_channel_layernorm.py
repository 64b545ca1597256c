"""cpl_fast.ops.channel_layernorm: every backend against the reference, gradients, registration, dispatch.

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
from cpl_fast.ops import channel_layernorm, channel_layernorm_reference
from cpl_fast.ops.channel_layernorm import DISPATCHER

SHAPES = {  # x shapes: odd channel counts, H = 1, W = 1, one pixel, several tiles with a partial last one
    "c37": (2, 37, 5, 7),
    "c1": (2, 1, 3, 4),
    "h1": (3, 5, 1, 9),
    "w1": (2, 6, 8, 1),
    "pixel": (1, 3, 1, 1),
    "tiles": (2, 13, 3, 70),
    "3d": (2, 4, 11),
}


def make_inputs(shape, dtype, device="cpu", bias=True):
    """Offset, scaled features (the mean and variance matter) and random affine parameters."""
    offset = torch.randn(shape[1], dtype=dtype, device=device).view((1, -1) + (1,) * (len(shape) - 2))
    x = torch.randn(shape, dtype=dtype, device=device) * 2.5 + offset
    weight = torch.randn(shape[1], dtype=dtype, device=device)
    b = torch.randn(shape[1], dtype=dtype, device=device) if bias else None
    return x, weight, b


def run_with_grads(fn, x, weight, bias, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "bias_free"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(backend, device, dtype, bias, shape):
    backend_or_skip(DISPATCHER, backend, device)
    x, weight, b = make_inputs(shape, dtype, device, bias)
    grad_out = torch.randn(shape, dtype=dtype, device=device)
    expected = run_with_grads(channel_layernorm_reference, x, weight, b, grad_out)
    actual = run_with_grads(lambda *a: channel_layernorm(*a, backend=backend), x, weight, b, grad_out)
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)   # grad_weight: sums
    for name, got, want in zip(("out", "grad_x", "grad_weight", "grad_bias"), actual, expected):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_reference_is_the_published_layer_norm():
    """The reference equals Restormer's to_3d -> WithBias/BiasFree_LayerNorm -> to_4d (and F.layer_norm)."""
    x, weight, bias = make_inputs((2, 6, 4, 5), torch.float64)
    tokens = x.flatten(2).transpose(1, 2)
    mu, var = tokens.mean(-1, keepdim=True), tokens.var(-1, keepdim=True, unbiased=False)
    with_bias = ((tokens - mu) / torch.sqrt(var + 1e-5) * weight + bias).transpose(1, 2).reshape(x.shape)
    bias_free = (tokens / torch.sqrt(var + 1e-5) * weight).transpose(1, 2).reshape(x.shape)
    exact = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(channel_layernorm_reference(x, weight, bias), with_bias, **exact)
    torch.testing.assert_close(channel_layernorm_reference(x, weight, None), bias_free, **exact)
    layer_norm = F.layer_norm(x.permute(0, 2, 3, 1), (6,), weight, bias, eps=1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(channel_layernorm_reference(x, weight, bias), layer_norm)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "bias_free"])
def test_non_contiguous_inputs(backend, device, bias):
    backend_or_skip(DISPATCHER, backend, device)
    dtype = torch.float64
    big = torch.randn(3, 14, 6, 11, dtype=dtype, device=device) + 1.5
    x = big[1:, ::2, :, 1::2]                                     # (2, 7, 6, 5), strided in every dim
    weight = torch.randn(2, 7, dtype=dtype, device=device)[1]     # a row of a matrix
    b = torch.randn(7, 2, dtype=dtype, device=device)[:, 0] if bias else None     # strided
    grad_out = torch.randn(2, 7, 6, 10, dtype=dtype, device=device)[..., ::2]
    assert not (x.is_contiguous() or grad_out.is_contiguous() or (b is not None and b.is_contiguous()))
    expected = run_with_grads(channel_layernorm_reference, x, weight, b, grad_out)
    actual = run_with_grads(lambda *a: channel_layernorm(*a, backend=backend), x, weight, b, grad_out)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", LOW_PRECISION, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "bias_free"])
def test_low_precision_error_budget(backend, device, dtype, bias):
    backend_or_skip(DISPATCHER, backend, device)
    x, weight, b = make_inputs((2, 21, 5, 9), dtype, device, bias)
    grad_out = torch.randn(x.shape, device=device).to(dtype)
    inputs = [t for t in (x, weight, b) if t is not None]
    if bias:
        low_precision_check(channel_layernorm_reference, lambda *a: channel_layernorm(*a, backend=backend),
                            inputs, grad_out, dtype)
    else:
        low_precision_check(lambda x, w: channel_layernorm_reference(x, w, None),
                            lambda x, w: channel_layernorm(x, w, None, backend=backend), inputs, grad_out,
                            dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "bias_free"])
def test_gradcheck(backend, bias):
    if backend != "reference":
        backend_or_skip(DISPATCHER, backend, "cpu")
    x, weight, b = make_inputs((2, 5, 3, 4), torch.float64, bias=bias)
    inputs = tuple(t.requires_grad_(True) for t in (x, weight, b) if t is not None)
    fn = ((lambda x, w, b: channel_layernorm(x, w, b, backend=backend)) if bias
          else (lambda x, w: channel_layernorm(x, w, None, backend=backend)))
    assert torch.autograd.gradcheck(fn, inputs)


def _cpu_op_or_skip() -> None:
    backend_or_skip(DISPATCHER, "cpu", "cpu")


@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "bias_free"])
def test_opcheck_registered_ops(bias):
    _cpu_op_or_skip()
    x, weight, b = make_inputs((2, 5, 3, 4), torch.float64, bias=bias)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.cpl_fast.channel_layernorm.default, (x, weight, b, 1e-5))
    _, mean, rstd = torch.ops.cpl_fast.channel_layernorm(x.detach(), weight.detach(), b, 1e-5)
    grad_out = torch.randn_like(x)
    torch.library.opcheck(torch.ops.cpl_fast._channel_layernorm_backward.default,
                          (grad_out, x.detach(), weight.detach(), mean, rstd, bias))


def test_cpu_backward_is_deterministic():
    _cpu_op_or_skip()
    torch.set_num_threads(max(2, torch.get_num_threads()))
    x, weight, _ = make_inputs((3, 24, 40, 41), torch.float32)
    _, mean, rstd = torch.ops.cpl_fast.channel_layernorm(x, weight, None, 1e-5)
    grad_out = torch.randn_like(x)
    first = torch.ops.cpl_fast._channel_layernorm_backward(grad_out, x, weight, mean, rstd, True)
    for _ in range(3):
        again = torch.ops.cpl_fast._channel_layernorm_backward(grad_out, x, weight, mean, rstd, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_statistics_are_returned_in_the_accumulation_type():
    _cpu_op_or_skip()
    x, weight, bias = make_inputs((2, 5, 3, 4), torch.bfloat16)
    out, mean, rstd = torch.ops.cpl_fast.channel_layernorm(x, weight, bias, 1e-5)
    assert out.dtype == torch.bfloat16 and mean.dtype == rstd.dtype == torch.float32
    assert mean.shape == rstd.shape == (2, 3, 4)
    torch.testing.assert_close(mean, x.float().mean(1))
    torch.testing.assert_close(rstd, (x.float().var(1, unbiased=False) + 1e-5).rsqrt())


def test_parameters_of_another_dtype_compute_in_the_promoted_dtype():
    """A float32 weight with bfloat16 features (autocast): the output dtype the reference gives (float32),
    computed from the features widened to float32 (the reference's statistics are rounded to bfloat16)."""
    _cpu_op_or_skip()
    x, weight, bias = make_inputs((2, 6, 3, 5), torch.float32)
    low = x.bfloat16()
    out = channel_layernorm(low, weight, bias)
    assert out.dtype == channel_layernorm_reference(low, weight, bias).dtype == torch.float32
    torch.testing.assert_close(out, channel_layernorm_reference(low.float(), weight, bias))


def test_compiled_op_checks_its_arguments():
    _cpu_op_or_skip()
    x, weight, bias = make_inputs((2, 5, 3, 4), torch.float32)
    with pytest.raises(RuntimeError, match=r"weight must be \(C,\)"):
        torch.ops.cpl_fast.channel_layernorm(x, weight[:4], bias, 1e-5)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.cpl_fast.channel_layernorm(x, weight.double(), bias, 1e-5)
    with pytest.raises(RuntimeError, match="one value per pixel"):
        torch.ops.cpl_fast._channel_layernorm_backward(x, x, weight, torch.zeros(3), torch.zeros(3), True)


# --- dispatch --------------------------------------------------------------------------------------

def test_auto_picks_cpu_backend_on_cpu():
    _cpu_op_or_skip()
    x, weight, bias = make_inputs((2, 5, 3, 4), torch.float32)
    assert DISPATCHER.select(x, weight, bias, 1e-5, device=x.device).name == "cpu"


def test_forced_backends(monkeypatch):
    x, weight, bias = make_inputs((2, 5, 3, 4), torch.float64)
    with pytest.raises(RuntimeError, match=r"backend .cuda. cannot run this call: .*tensors, not cpu"):
        channel_layernorm(x, weight, bias, backend="cuda")
    if not INTERPRETED and not HAS_CUDA:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            channel_layernorm(x, weight, bias, backend="triton")
    monkeypatch.setenv("CPL_FAST_BACKEND", "reference")
    expected = channel_layernorm_reference(x, weight, bias)
    torch.testing.assert_close(channel_layernorm(x, weight, bias), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        channel_layernorm(x, weight, bias, backend="fast")


def test_auto_falls_back_to_reference_for_float16_and_says_so(caplog):
    _cpu_op_or_skip()
    x, weight, bias = make_inputs((2, 5, 3, 4), torch.float16)
    DISPATCHER._announced.discard(("reference", "cpu"))
    with caplog.at_level(logging.WARNING, logger="cpl_fast"):
        out = channel_layernorm(x, weight, bias)
    assert "uses the 'reference' backend" in caplog.text and "float16" in caplog.text
    torch.testing.assert_close(out, channel_layernorm_reference(x, weight, bias))


def test_available_backends_reports_the_op():
    report = cpl_fast.ops.available_backends("cpu")["channel_layernorm"]
    assert report["reference"] == [] and report["cuda"]
    assert (report["cpu"] == []) == (_extension.load_error() is None)


# --- bad inputs ------------------------------------------------------------------------------------

def _bad(**change):
    args = dict(x=torch.randn(2, 4, 3, 3), weight=torch.randn(4), bias=torch.randn(4), eps=1e-5)
    args.update(change)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(x=torch.randn(4)), ValueError, r"x must be \(B, C, ...\)"),
    (_bad(x=torch.randint(0, 3, (2, 4, 3, 3))), ValueError, "floating-point"),
    (_bad(x=torch.randn(2, 0, 3, 3), weight=torch.randn(0), bias=torch.randn(0)), ValueError,
     "at least one channel"),
    (_bad(weight=torch.randn(5)), ValueError, r"weight must be \(4,\)"),
    (_bad(bias=torch.randn(4, 1)), ValueError, r"bias must be \(4,\)"),
    (_bad(weight=torch.randint(0, 3, (4,))), ValueError, "weight must be floating-point"),
    (_bad(bias=[0.0] * 4), TypeError, "bias must be a tensor or None"),
    (_bad(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    (_bad(eps=float("nan")), ValueError, "eps must be a finite number >= 0"),
    (_bad(weight="w"), TypeError, "must be tensors"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        channel_layernorm(args["x"], args["weight"], args["bias"], args["eps"])


# --- Triton --------------------------------------------------------------------------------------

def test_triton_opcheck():
    device = "cuda" if HAS_CUDA else "cpu"
    backend_or_skip(DISPATCHER, "triton", device)
    x, weight, bias = make_inputs((2, 5, 3, 4), torch.float64, device)
    x.requires_grad_(True)
    # Under TRITON_INTERPRET=1 the interpreted kernel would run on fake tensors: the fake-tensor and
    # AOT-dispatch checks need a real GPU kernel.
    utils = ("test_schema", "test_autograd_registration") if device == "cpu" else None
    torch.library.opcheck(torch.ops.cpl_fast.channel_layernorm_triton.default, (x, weight, bias, 1e-5),
                          test_utils=utils or torch.library._OPCHECK_DEFAULT_UTILS)


def test_triton_kernels_compile_for_sm90():
    """The Triton kernels lower to a Hopper cubin (no GPU needed: Triton ships ptxas)."""
    if INTERPRETED:
        pytest.skip("compiles for the GPU: runs in the parent process, not under TRITON_INTERPRET=1")
    from cpl_fast.kernels import channel_layernorm as kernels
    from triton_aot import compile_for_sm90

    pointers = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "pw_ptr": "*fp32", "pb_ptr": "*fp32"}
    for kernel in (kernels._channel_layernorm_fwd_kernel, kernels._channel_layernorm_bwd_kernel):
        compile_for_sm90(kernel, pointers, constexprs={"HAS_BIAS": True, "WITH_BIAS": True, "USE_FP64": False,
                                                       "BLOCK": 128}, floats=("eps",))


def test_interpreted_kernels_in_subprocess():
    run_interpreted(__file__)

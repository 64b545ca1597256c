"""cpl_fast.ops.channel_layernorm: the shared op tests (tests/op_harness.py) and the op's own.

The Triton kernels run on a CUDA device when there is one; on the CPU they run under ``TRITON_INTERPRET=1``
in a child process (``test_interpreted_kernels_in_subprocess``), and the Triton cases of this process skip.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_harness import INTERPRETED, Inputs, KernelOpTester, backend_or_skip

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


def _non_contiguous(bias):
    def make(dtype, device):
        """Strided in every dim: a slice of x, a row of a matrix as weight, a column as bias."""
        leaves = [torch.randn(3, 14, 6, 11, dtype=dtype, device=device) + 1.5,
                  torch.randn(2, 7, dtype=dtype, device=device)]
        if bias:
            leaves.append(torch.randn(7, 2, dtype=dtype, device=device))
        grad_out = torch.randn(2, 7, 6, 10, dtype=torch.float64, device=device)[..., ::2]

        def build(big, w, b=None):
            return big[1:, ::2, :, 1::2], w[1], (None if b is None else b[:, 0])
        return Inputs(leaves, build, [grad_out])
    return make


class TestChannelLayernorm(KernelOpTester):
    fn = channel_layernorm
    reference = channel_layernorm_reference
    dispatcher = DISPATCHER
    # float32 grad_weight and grad_bias are sums over every pixel.
    tol = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-5)}
    cases = {f"{name}-{kind}": (shape, kind == "with_bias") for name, shape in SHAPES.items()
             for kind in ("with_bias", "bias_free")}
    cases["lowprec-with_bias"], cases["lowprec-bias_free"] = ((2, 21, 5, 9), True), ((2, 21, 5, 9), False)
    low_precision_cases = ("lowprec-with_bias", "lowprec-bias_free")
    non_contiguous_cases = {"with_bias": _non_contiguous(True), "bias_free": _non_contiguous(False)}
    gradcheck_cases = {"with_bias": ((2, 5, 3, 4), True), "bias_free": ((2, 5, 3, 4), False)}
    dispatch_case = ((2, 5, 3, 4), True)
    opcheck_variants = {"with_bias": True, "bias_free": False}

    def reference_cases(self):
        return [c for c in super().reference_cases() if not c[0].startswith("lowprec")]

    def make_inputs(self, case, dtype, device):
        if callable(case):
            return case(dtype, device)
        shape, bias = case
        leaves = [t for t in make_inputs(shape, dtype, device, bias) if t is not None]
        grad_out = torch.randn(shape, dtype=torch.float64, device=device)
        return Inputs(leaves, lambda x, w, b=None: (x, w, b), [grad_out])

    def names(self, inputs):
        return ["out", "grad_x", "grad_weight", "grad_bias"][:1 + len(inputs.leaves)]

    def opcheck_calls(self, backend, device, bias):
        x, weight, b = make_inputs((2, 5, 3, 4), torch.float64, device, bias=bias)
        x.requires_grad_(True)
        weight.requires_grad_(True)
        if backend == "triton":
            return [(torch.ops.cpl_fast.channel_layernorm_triton.default, (x, weight, b, 1e-5))]
        _, mean, rstd = torch.ops.cpl_fast.channel_layernorm(x.detach(), weight.detach(), b, 1e-5)
        return [(torch.ops.cpl_fast.channel_layernorm.default, (x, weight, b, 1e-5)),
                (torch.ops.cpl_fast._channel_layernorm_backward.default,
                 (torch.randn_like(x), x.detach(), weight.detach(), mean, rstd, bias))]

    def bad_inputs(self):
        def bad(**change):
            args = dict(x=torch.randn(2, 4, 3, 3), weight=torch.randn(4), bias=torch.randn(4), eps=1e-5)
            args.update(change)
            return (args["x"], args["weight"], args["bias"], args["eps"]), {}

        return {
            "x_1d": (*bad(x=torch.randn(4)), ValueError, r"x must be \(B, C, ...\)"),
            "x_int": (*bad(x=torch.randint(0, 3, (2, 4, 3, 3))), ValueError, "floating-point"),
            "no_channels": (*bad(x=torch.randn(2, 0, 3, 3), weight=torch.randn(0), bias=torch.randn(0)),
                            ValueError, "at least one channel"),
            "weight_shape": (*bad(weight=torch.randn(5)), ValueError, r"weight must be \(4,\)"),
            "bias_shape": (*bad(bias=torch.randn(4, 1)), ValueError, r"bias must be \(4,\)"),
            "weight_int": (*bad(weight=torch.randint(0, 3, (4,))), ValueError,
                           "weight must be floating-point"),
            "bias_list": (*bad(bias=[0.0] * 4), TypeError, "bias must be a tensor or None"),
            "eps_negative": (*bad(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
            "eps_nan": (*bad(eps=float("nan")), ValueError, "eps must be a finite number >= 0"),
            "weight_str": (*bad(weight="w"), TypeError, "must be tensors"),
        }


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


def _cpu_op_or_skip() -> None:
    backend_or_skip(DISPATCHER, "cpu", "cpu")


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


# --- Triton --------------------------------------------------------------------------------------

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

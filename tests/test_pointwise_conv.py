"""cpl_fast.ops.pointwise_conv (the 1x1 convolution as a batched GEMM) and the PointwiseConv2d module: the
shared op tests (tests/op_harness.py) and the op's own."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from op_harness import TOL, Inputs, OpTester
from torch.utils._python_dispatch import TorchDispatchMode

from cpl_fast.models.restormer import PointwiseConv2d, set_backbone_ops
from cpl_fast.ops import pointwise_conv, pointwise_conv_reference
from cpl_fast.ops.pointwise_conv import takes_gemm

# One thread: pointwise_conv takes the GEMM there (batch below 16), which is what most cases check.
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {  # (B, C, O, H, W): odd channel counts, one channel in or out, H = 1, W = 1, batch 1
    "odd": (2, 13, 7, 5, 9),
    "c1": (3, 1, 5, 4, 4),
    "o1": (2, 6, 1, 3, 5),
    "h1": (2, 5, 4, 1, 11),
    "w1": (1, 4, 6, 7, 1),
    "pixel": (4, 3, 2, 1, 1),
}


class AtenOps(TorchDispatchMode):
    """Records the aten ops a block of code runs."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _non_contiguous(layout):
    def make(dtype, device):
        weight = torch.randn(4, 10, dtype=dtype, device=device)

        def strided(w):
            return w[:, ::2].reshape(4, 5, 1, 1)
        grad_out = torch.randn(2, 4, 6, 14, dtype=torch.float64, device=device)[..., ::2]
        if layout == "channels_last":
            x = torch.randn(2, 5, 6, 7, dtype=dtype, device=device).to(memory_format=torch.channels_last)
            return Inputs([x, weight], lambda x, w: (x, strided(w)), [grad_out])
        x = torch.randn(3, 10, 6, 14, dtype=dtype, device=device)
        return Inputs([x, weight], lambda x, w: (x[1:, ::2, :, ::2], strided(w)), [grad_out])
    return make


class TestPointwiseConv(OpTester):
    fn = pointwise_conv
    reference = pointwise_conv_reference
    # No kernels of its own: "auto" is the GEMM on one CPU thread (the module's one_thread fixture).
    backends = (("auto", "cpu"),)
    cases = {f"{name}-{kind}": (shape, kind == "bias") for name, shape in SHAPES.items()
             for kind in ("bias", "no_bias")}
    non_contiguous_cases = {layout: _non_contiguous(layout) for layout in ("channels_last", "sliced")}
    gradcheck_cases = {"bias": ((2, 3, 4, 4, 5), True)}
    test_low_precision_error_budget = None     # autocast is test_autocast_gives_the_convolution_dtype

    def make_inputs(self, case, dtype, device):
        if callable(case):
            return case(dtype, device)
        (batch, cin, cout, height, width), bias = case
        leaves = [torch.randn(batch, cin, height, width, dtype=dtype, device=device),
                  torch.randn(cout, cin, 1, 1, dtype=dtype, device=device)]
        if bias:
            leaves.append(torch.randn(cout, dtype=dtype, device=device))
        grad_out = torch.randn(batch, cout, height, width, dtype=torch.float64, device=device)
        return Inputs(leaves, lambda x, w, b=None: (x, w, b), [grad_out])

    def bad_inputs(self):
        x, w = torch.randn(2, 4, 3, 3), torch.randn(5, 4, 1, 1)
        one_by_one = r"weight must be \(O, 4, 1, 1\)"
        return {
            "x_3d": ((torch.randn(2, 4, 3), w, None), {}, ValueError, r"x must be \(B, C, H, W\)"),
            "kernel_3x3": ((x, torch.randn(5, 4, 3, 3), None), {}, ValueError, one_by_one),
            "channels": ((x, torch.randn(5, 3, 1, 1), None), {}, ValueError, one_by_one),
            "bias": ((x, w, torch.randn(4)), {}, ValueError, r"bias must be None or \(5,\)"),
            "dtype": ((x, torch.randn(5, 4, 1, 1, dtype=torch.float64), None), {}, ValueError, "dtype"),
            "type": ((x, "w", None), {}, TypeError, "must be tensors"),
        }


@pytest.fixture
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gemm_only_where_pytorch_takes_its_slow_path(one_cpu_thread):
    assert takes_gemm(torch.randn(15, 2, 3, 3)) and not takes_gemm(torch.randn(16, 2, 3, 3))
    torch.set_num_threads(2)
    assert not takes_gemm(torch.randn(2, 2, 3, 3))
    with AtenOps() as ops:
        pointwise_conv(torch.randn(2, 4, 3, 3), torch.randn(5, 4, 1, 1))
    assert "convolution" in ops.names and "bmm" not in ops.names


def test_cpu_runs_a_gemm_and_reference_a_convolution(monkeypatch, one_cpu_thread):
    x, weight = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(5, 4, 1, 1, requires_grad=True)
    with AtenOps() as gemm:
        pointwise_conv(x, weight).sum().backward()
    assert "bmm" in gemm.names and not any("convolution" in n for n in gemm.names), gemm.names
    monkeypatch.setenv("CPL_FAST_BACKEND", "reference")
    with AtenOps() as reference:
        out = pointwise_conv(x, weight)
    assert "convolution" in reference.names and "bmm" not in reference.names, reference.names
    torch.testing.assert_close(out, F.conv2d(x, weight), rtol=0, atol=0)
    monkeypatch.setenv("CPL_FAST_BACKEND", "cpu")          # names of kernel backends leave the GEMM
    with AtenOps() as forced:
        pointwise_conv(x, weight)
    assert "bmm" in forced.names


def test_autocast_gives_the_convolution_dtype(one_cpu_thread):
    x, weight = torch.randn(2, 4, 3, 3), torch.randn(5, 4, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = pointwise_conv(x, weight), F.conv2d(x, weight)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        pointwise_conv(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1), backend="fast")


def test_module_keeps_conv2d_parameters_and_switches(one_cpu_thread):
    conv = nn.Conv2d(6, 4, kernel_size=1, bias=True).double()
    module = PointwiseConv2d(6, 4, bias=True).double()
    assert isinstance(module, nn.Conv2d)
    module.load_state_dict(conv.state_dict())
    assert list(module.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(module(x), conv(x), **TOL[torch.float64])
    set_backbone_ops(module, "reference")
    with AtenOps() as ops:
        module(x)
    assert "convolution" in ops.names
    module.ops = "fast"
    with pytest.raises(ValueError, match="ops must be one of"):
        module(x)

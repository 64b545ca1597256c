"""bench/flops.py, the FLOP counter of the benchmarks, against counts worked out by hand.

A FLOP is a multiply or an add (one multiply-add = 2). Every expected number below is written as
``2 * (outputs) * (multiply-adds per output)`` of the product that computes it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_FLOPS = Path(__file__).parents[1] / "bench" / "flops.py"   # bench/ is no package
_SPEC = importlib.util.spec_from_file_location("bench_flops", _FLOPS)
flops = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(flops)


def forward_and_backward(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FLOPs of ``module(x)`` and of its backward (to the weights, and to x when it requires grad)."""
    out = None

    def forward():
        nonlocal out
        out = module(x)

    fwd = flops.count_flops(forward)
    bwd = flops.count_flops(lambda: out.backward(torch.ones_like(out)))
    return fwd, bwd


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "weights-only"])
def test_dense_conv(input_grad):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5, requires_grad=input_grad)
    fwd, bwd = forward_and_backward(conv, x)
    # 2 * 4 * 5 * 5 = 200 outputs, each 3 channels * 3 * 3 taps = 27 multiply-adds.
    assert fwd == 2 * 200 * 27 == 10800
    # grad_weight: 4 * 3 * 3 * 3 = 108 entries, each summed over 2 * 5 * 5 = 50 positions (5400 MACs);
    # grad_input: 2 * 3 * 5 * 5 = 150 entries, each 4 channels * 9 taps = 36 multiply-adds (5400 MACs).
    assert bwd == (2 * 108 * 50) + (2 * 150 * 36 if input_grad else 0)


def test_dense_conv_agrees_with_torch():
    """Where torch's own formula is right (groups = 1), both counters agree."""
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    x = torch.randn(3, 5, 9, 11, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        conv(x).sum().backward()
    assert flops.count_flops(lambda: conv(x).sum().backward()) == counter.get_total_flops()


def test_depthwise_conv():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    fwd, bwd = forward_and_backward(conv, x)
    # 2 * 8 * 6 * 6 = 576 outputs, each one channel * 9 taps.
    assert fwd == 2 * 576 * 9 == 10368
    # grad_weight: 8 * 9 = 72 entries over 2 * 6 * 6 = 72 positions; grad_input: 576 entries * 9 taps.
    assert bwd == 2 * 72 * 72 + 2 * 576 * 9 == 2 * fwd


def test_cpl_fast_depthwise_op_counts_as_the_convolution():
    """The fused model's depthwise convolutions (cpl_fast::depthwise_conv3x3) count as the module they replace."""
    from cpl_fast.models.restormer import DepthwiseConv3x3
    from cpl_fast.ops.depthwise_conv import DISPATCHER

    if DISPATCHER.kernels.load_error is not None:
        pytest.skip(DISPATCHER.kernels.load_error)
    conv = DepthwiseConv3x3(8)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    fwd, bwd = forward_and_backward(conv, x)
    assert fwd == 2 * 576 * 9 == 10368
    assert bwd == 2 * fwd
    conv.ops = "reference"
    assert forward_and_backward(conv, x) == (fwd, bwd)


def test_grouped_conv():
    conv = nn.Conv2d(6, 4, 3, groups=2)
    x = torch.randn(1, 6, 7, 7, requires_grad=True)
    fwd, bwd = forward_and_backward(conv, x)
    # 4 * 5 * 5 = 100 outputs, each 6 / 2 = 3 channels * 9 taps.
    assert fwd == 2 * 100 * 27 == 5400
    # grad_weight: 4 * 3 * 9 = 108 entries over 25 positions; grad_input: the same 2700 multiply-adds.
    assert bwd == 2 * 108 * 25 + 2 * 2700


def test_grouped_transposed_conv():
    conv = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=False)
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    fwd, bwd = forward_and_backward(conv, x)
    # Each of the 4 * 3 * 3 = 36 inputs is spread onto 6 / 2 = 3 channels * 2 * 2 taps.
    assert fwd == 2 * 36 * 12 == 864
    assert bwd == 2 * fwd


def test_linear():
    linear = nn.Linear(16, 32)
    x = torch.randn(4, 16, requires_grad=True)
    fwd, bwd = forward_and_backward(linear, x)
    # 4 * 32 outputs, each 16 multiply-adds.
    assert fwd == 2 * 128 * 16 == 4096
    # grad_x: 4 * 16 entries of 32 multiply-adds; grad_W: 32 * 16 entries of 4 multiply-adds.
    assert bwd == 2 * 64 * 32 + 2 * 512 * 4 == 8192


def test_matmul():
    a = torch.randn(3, 5, 7, requires_grad=True)
    b = torch.randn(7, 2, requires_grad=True)
    out = None

    def forward():
        nonlocal out
        out = a @ b

    # 3 * 5 * 2 = 30 outputs of 7 multiply-adds; grad_a: 105 entries of 2; grad_b: 14 entries of 15.
    assert flops.count_flops(forward) == 2 * 30 * 7 == 420
    assert flops.count_flops(lambda: out.backward(torch.ones_like(out))) == 2 * 105 * 2 + 2 * 14 * 15 == 840


def test_conv_backward_formula_follows_the_output_mask():
    """Direct call of the formula: no gradient asked, no FLOPs; the bias gradient is not counted."""
    args = ([2, 4, 5, 5], [2, 3, 5, 5], [4, 3, 3, 3], [4], [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    assert flops.conv_backward_flops(*args, [False, False, True]) == 0
    assert flops.conv_backward_flops(*args, [True, False, True]) == 10800
    assert flops.conv_backward_flops(*args, [True, True, False]) == 21600

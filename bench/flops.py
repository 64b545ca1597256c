"""FLOP counts of forward and backward passes, with grouped convolutions' backward counted right.

``torch.utils.flop_counter.FlopCounterMode`` counts the weight gradient of a convolution as the
convolution ``conv(input^T, grad_out^T)`` over the *whole* input channel count, whatever ``groups``
is, so it counts ``groups`` times the multiply-adds done: a depthwise convolution's backward
(``groups = C``) comes out about ``C / 2`` times too high. The restoration networks here are full of
depthwise 3x3 convolutions, so a training step counted that way is several times too high.

The rule used here (:data:`RULE`, printed beside every count in bench/results/):

* a FLOP is a multiply or an add: one multiply-add is 2 FLOPs, as in torch's counter;
* a convolution forward costs ``2 N C_out (C_in / groups) prod(kernel) prod(output spatial)`` FLOPs
  (transposed: ``2 N C_in (C_out / groups) prod(kernel) prod(input spatial)``), as torch counts it;
* its backward costs that same amount once for the input gradient and once for the weight gradient,
  each only when asked for (``output_mask``): every multiply-add of the forward appears exactly once
  in each of the two gradient products. Bias gradients, like biases, are not counted;
* cpl_fast's ``depthwise_conv3x3`` (the blocks' depthwise convolutions in the fused model) is counted
  as the convolution it computes: ``2 N C 9 H W`` forward, twice that backward (input and weight
  gradients, which its backward always computes);
* everything else is torch's registry (matrix products ``2 m n k``, attention); elementwise work,
  norms and resizes are not counted.

``tests/test_flops.py`` checks the rule against hand-computed counts.
"""
from __future__ import annotations

from collections.abc import Callable
from math import prod

import torch
from torch.utils.flop_counter import FlopCounterMode

RULE = ("FLOPs = 2 per multiply-add; convolution backward = the forward's FLOPs once per gradient "
        "asked for (input, weight), groups counted, cpl_fast's depthwise op as the convolution it computes "
        "(bench/flops.py); torch.utils.flop_counter for the rest")


def conv_flops(x_shape, w_shape, out_shape, transposed: bool) -> int:
    """FLOPs of one convolution forward; ``w_shape`` as torch stores it (``groups`` already divided out)."""
    batch = x_shape[0]
    # Each weight meets one input (transposed) or one output (direct) position per sample.
    positions = prod((x_shape if transposed else out_shape)[2:])
    return 2 * batch * prod(w_shape) * positions


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the forward's FLOPs per gradient in ``output_mask[:2]``."""
    forward = conv_flops(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def depthwise_conv3x3_flops(x_shape, _w_shape, out_shape=None, **_kwargs) -> int:
    """FLOPs of ``cpl_fast::depthwise_conv3x3``: one 3x3 multiply-add per channel and output position."""
    return 2 * prod(x_shape) * 9


def depthwise_conv3x3_backward_flops(_grad_shape, x_shape, _w_shape, out_shape=None, **_kwargs) -> int:
    """FLOPs of ``cpl_fast::_depthwise_conv3x3_backward``: the forward's once each for grad_x and grad_weight."""
    return 2 * depthwise_conv3x3_flops(x_shape, None)


def _custom_mapping() -> dict:
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    import cpl_fast.ops  # noqa: F401  (loads the extension, which registers the cpl_fast ops)

    if hasattr(torch.ops.cpl_fast, "depthwise_conv3x3"):
        mapping[torch.ops.cpl_fast.depthwise_conv3x3] = depthwise_conv3x3_flops
        mapping[torch.ops.cpl_fast._depthwise_conv3x3_backward] = depthwise_conv3x3_backward_flops
    return mapping


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that counts convolution backwards by :data:`RULE`."""
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn()`` runs (forward and backward), counted by :data:`RULE`."""
    counter = flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()

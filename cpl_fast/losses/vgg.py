"""The VGG19 convolution stack, laid out exactly like torchvision's ``vgg19().features``.

torchvision is not a dependency, so the stack is written here; module indices match
torchvision's, so the state dict keys (``features.<i>.weight`` / ``.bias``) of the published
``vgg19-dcbb9e9d.pth`` load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

# torchvision's configuration "E" (VGG19): channel counts, "M" for a 2x2 max-pool.
VGG19_CONFIG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                        512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

# File name of torchvision's ImageNet VGG19 weights (as stored in the torch hub cache).
VGG19_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"
VGG19_WEIGHTS_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"

# The five taps of the contrastive-regularisation convention, shallow to deep.
VGG19_DEFAULT_TAPS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def vgg19_layer_names() -> list[str]:
    """Names of the modules of ``features`` in order: ``conv1_1, relu1_1, ..., pool5``."""
    names: list[str] = []
    block, index = 1, 1
    for item in VGG19_CONFIG:
        if item == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
            index += 1
    return names


def vgg19_features() -> nn.Sequential:
    """A fresh (untrained) VGG19 ``features`` stack with torchvision's module indices.

    The ReLUs are not in-place: a tapped activation must survive the next layer unchanged.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG19_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = int(item)
    return nn.Sequential(*layers)


def init_vgg19_randomly(features: nn.Sequential, seed: int) -> None:
    """torchvision's VGG initialisation (Kaiming-normal fan-out, zero bias), seeded."""
    generator = torch.Generator().manual_seed(seed)
    for module in features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            nn.init.zeros_(module.bias)

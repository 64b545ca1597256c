"""Restoration metrics (PSNR, SSIM, the BasicSR luma) and the entropy of a selection distribution.

Images are ``(3, H, W)`` (or ``(1, 3, H, W)``) tensors in ``[0, 1]``, or ``(H, W, 3)`` arrays.
Everything is computed with scikit-image, in float64:

* ``psnr`` / ``ssim``: ``data_range`` given explicitly (1 for ``[0, 1]`` images, 255 for BasicSR's
  ``[0, 255]`` scale), images clipped to that range first;
* ``ssim(..., window="uniform")``: scikit-image's default, a 7x7 uniform window with the sample
  covariance, per channel then averaged (PromptIR's and OneRestore's scoring);
* ``ssim(..., window="gaussian")``: Wang et al.'s 11x11 Gaussian window (sigma 1.5, population
  covariance). scikit-image then drops a 5-pixel border of the SSIM map, which is exactly the
  ``valid`` filtering of BasicSR's ``calculate_ssim``, so the two agree;
* ``rgb_to_y``: BasicSR's ``to_y_channel`` (MATLAB's luma ``16 + 65.481 R + 128.553 G + 24.966 B``
  on ``[0, 1]`` inputs, in ``[16, 235]``, unrounded), the same as scikit-image's ``rgb2ycbcr``.

Entropies are in bits.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

SSIM_WINDOWS = ("uniform", "gaussian")
# MATLAB's / BasicSR's luma weights for RGB in [0, 1], giving Y in [16, 235].
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0

if TYPE_CHECKING:  # imported where used: the commands' --help must not wait for torch
    import torch


def to_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """One image as an ``(H, W, C)`` float64 array; tensors are RGB ``(3, H, W)`` or ``(1, 3, H, W)``,
    arrays ``(H, W, C)`` or ``(H, W)`` (a single channel, e.g. the Y channel)."""
    import torch

    if isinstance(image, torch.Tensor):
        if image.dim() == 4:
            if image.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
            image = image[0]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(image.shape)}")
        return image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {arr.shape}")
    return arr


def _pair(restored: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
          data_range: float) -> tuple[np.ndarray, np.ndarray]:
    a, b = to_hwc(restored), to_hwc(target)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape} (H, W, C)")
    if a.shape[2] not in (1, 3):
        raise ValueError(f"expected an RGB or single-channel image, got {a.shape[2]} channels")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("images contain NaN or infinite values")
    return np.clip(a, 0.0, data_range), np.clip(b, 0.0, data_range)


def psnr(restored: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
         data_range: float = 1.0) -> float:
    """PSNR in dB (``inf`` for identical images), both clipped to ``[0, data_range]``."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _pair(restored, target, data_range)
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=data_range))


def ssim(restored: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
         data_range: float = 1.0, window: str = "uniform") -> float:
    """SSIM, averaged over channels; ``window`` is ``uniform`` (7x7) or ``gaussian`` (11x11, sigma 1.5)."""
    from skimage.metrics import structural_similarity

    if window not in SSIM_WINDOWS:
        raise ValueError(f"unknown SSIM window {window!r}; choose one of {', '.join(SSIM_WINDOWS)}")
    a, b = _pair(restored, target, data_range)
    options = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False} \
        if window == "gaussian" else {}
    return float(structural_similarity(b, a, data_range=data_range, channel_axis=2, **options))


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BasicSR's Y channel of an ``(H, W, 3)`` RGB array in ``[0, 1]``: ``(H, W, 1)`` in ``[16, 235]``."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {arr.shape}")
    return (arr @ np.asarray(Y_WEIGHTS) + Y_OFFSET)[:, :, None]


def crop_border(image: np.ndarray, border: int) -> np.ndarray:
    """Drop ``border`` pixels from each edge of an ``(H, W, C)`` array (BasicSR's ``crop_border``)."""
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return image
    h, w = image.shape[:2]
    if 2 * border >= min(h, w):
        raise ValueError(f"crop_border {border} leaves nothing of a {w}x{h} image")
    return image[border:h - border, border:w - border]


def quantize(image: np.ndarray) -> np.ndarray:
    """``[0, 1]`` float to BasicSR's ``tensor2img`` levels: clipped, ``* 255``, rounded (float64)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0)


def entropy_bits(distribution: torch.Tensor | np.ndarray) -> float:
    """Shannon entropy in bits of a non-negative vector, normalised to sum to one first."""
    import torch

    p = torch.as_tensor(distribution, dtype=torch.float64).flatten()
    if p.numel() == 0 or bool((p < 0).any()) or not bool(torch.isfinite(p).all()):
        raise ValueError("entropy needs a non-empty, finite, non-negative vector")
    total = p.sum()
    if total <= 0:
        raise ValueError("entropy needs a vector with a positive sum")
    p = p / total
    nz = p[p > 0]
    return max(0.0, float(-(nz * torch.log2(nz)).sum()))  # no -0.0 for a one-hot vector


def batch_psnr(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of ``[0, 1]`` images clipped to range, ``(..., C, H, W)`` -> ``(...)``."""
    mse = (image.clamp(0, 1) - target.clamp(0, 1)).double().pow(2).flatten(-3).mean(dim=-1)
    return 10.0 * (1.0 / mse.clamp_min(1e-10)).log10()

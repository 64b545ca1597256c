"""Named metric protocols: how a benchmark's published numbers were scored.

A protocol fixes everything between the network's output and the two numbers: a centre crop of
input and target to a multiple before inference (PromptIR's ``crop_img``), quantisation to 8-bit
levels (BasicSR's ``tensor2img``), the colour space (RGB or BasicSR's Y), the border dropped
before scoring and the SSIM window. ``PROTOCOLS`` is the registry; ``get_protocol(name)`` looks one
up, optionally with another ``crop_border``.

=============  =====  ==========  ======  ========  =====================
name           space  crop to     border  quantise  SSIM window
=============  =====  ==========  ======  ========  =====================
``promptir``   RGB    16          0       no        uniform 7x7 (skimage)
``basicsr_y``  Y      --          0       yes       Gaussian 11x11, 1.5
``mioir``      RGB    --          4       yes       Gaussian 11x11, 1.5
``onerestore`` RGB    --          0       no        uniform 7x7 (skimage)
=============  =====  ==========  ======  ========  =====================

MiOIR publishes PSNR only (its SSIM call is commented out); the SSIM reported under ``mioir`` is
BasicSR's on the same RGB crop.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cpl_fast.metrics.image import SSIM_WINDOWS, crop_border, psnr, quantize, rgb_to_y, ssim, to_hwc

SPACES = ("rgb", "y")

if TYPE_CHECKING:  # imported where used: the commands' --help must not wait for torch
    import torch


@dataclass(frozen=True)
class Protocol:
    """How one benchmark scores a restoration; ``score(restored, target) -> (psnr, ssim)``."""

    name: str
    space: str                      # rgb | y
    crop_multiple: int | None       # centre crop input and target to this multiple before inference
    crop_border: int                # pixels dropped from each edge before scoring
    quantize: bool                  # round to 8-bit levels first (scores then on [0, 255])
    ssim_window: str                # uniform (skimage default) | gaussian (Wang et al., BasicSR)
    source: str                     # whose evaluation code this follows

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"protocol {self.name}: space must be one of {SPACES}, got {self.space!r}")
        if self.ssim_window not in SSIM_WINDOWS:
            raise ValueError(f"protocol {self.name}: unknown SSIM window {self.ssim_window!r}")
        if self.crop_multiple is not None and self.crop_multiple < 1:
            raise ValueError(f"protocol {self.name}: crop_multiple must be >= 1, got {self.crop_multiple}")
        if self.crop_border < 0:
            raise ValueError(f"protocol {self.name}: crop_border must be >= 0, got {self.crop_border}")

    @property
    def label(self) -> str:
        """A short tag printed next to every score, e.g. ``promptir (RGB, crop 16)``."""
        parts = [self.space.upper() if self.space == "rgb" else "Y"]
        if self.crop_multiple:
            parts.append(f"crop {self.crop_multiple}")
        if self.crop_border:
            parts.append(f"border {self.crop_border}")
        if self.quantize:
            parts.append("uint8")
        return f"{self.name} ({', '.join(parts)})"

    @property
    def description(self) -> str:
        crop = f"centre crop of input and target to a multiple of {self.crop_multiple}, " \
            if self.crop_multiple else ""
        levels = "output rounded to 8-bit levels, scored on [0, 255]" if self.quantize \
            else "output clipped to [0, 1], not quantised"
        space = "RGB" if self.space == "rgb" else "Y channel (BasicSR: 16 + 65.481 R + 128.553 G + 24.966 B)"
        window = "7x7 uniform window, sample covariance" if self.ssim_window == "uniform" \
            else "11x11 Gaussian window (sigma 1.5)"
        return (f"{self.name}: {crop}{levels}; {space}; crop_border {self.crop_border}; PSNR and SSIM "
                f"(scikit-image, {window}, mean over channels), per image, averaged; follows {self.source}")

    def with_border(self, border: int | None) -> Protocol:
        """The same protocol with another ``crop_border`` (``None`` keeps it)."""
        return self if border is None else dataclasses.replace(self, crop_border=border)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """Centre-crop ``(..., H, W)`` to multiples of ``crop_multiple`` (PromptIR's ``crop_img``)."""
        if not self.crop_multiple:
            return image
        h, w = image.shape[-2:]
        base = self.crop_multiple
        ch, cw = h % base, w % base
        if ch == h or cw == w:
            raise ValueError(f"protocol {self.name}: image {w}x{h} is smaller than its crop multiple {base}")
        return image[..., ch // 2:h - ch + ch // 2, cw // 2:w - cw + cw // 2]

    def images(self, restored: torch.Tensor | np.ndarray,
               target: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """The two arrays exactly as scored, and their data range."""
        a, b = np.clip(to_hwc(restored), 0.0, 1.0), np.clip(to_hwc(target), 0.0, 1.0)
        if a.shape != b.shape:
            raise ValueError(f"images differ in shape: {a.shape} vs {b.shape} (H, W, C)")
        data_range = 1.0
        if self.quantize:
            a, b, data_range = quantize(a), quantize(b), 255.0
        if self.space == "y":
            a, b, data_range = rgb_to_y(a / data_range), rgb_to_y(b / data_range), 255.0
        return crop_border(a, self.crop_border), crop_border(b, self.crop_border), data_range

    def score(self, restored: torch.Tensor | np.ndarray,
              target: torch.Tensor | np.ndarray) -> tuple[float, float]:
        """``(PSNR dB, SSIM)`` of one restoration against its target, both in ``[0, 1]``."""
        a, b, data_range = self.images(restored, target)
        return psnr(a, b, data_range), ssim(a, b, data_range, self.ssim_window)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p for p in (
        Protocol("promptir", "rgb", 16, 0, False, "uniform", "PromptIR / AdaIR test scripts"),
        Protocol("basicsr_y", "y", None, 0, True, "gaussian", "BasicSR calculate_psnr/ssim, test_y_channel"),
        Protocol("mioir", "rgb", None, 4, True, "gaussian", "MiOIR (BasicSR metrics, crop_border 4)"),
        Protocol("onerestore", "rgb", None, 0, False, "uniform", "OneRestore cal_psnr_ssim (CDD-11)"),
    )
}

# The protocol each training preset's benchmark publishes its numbers under.
DEFAULT_PROTOCOLS = {"three_task": "promptir", "five_task": "promptir", "demo": "promptir",
                     "repro": "promptir", "all_weather": "promptir", "seven_task": "mioir",
                     "weatherbench": "basicsr_y", "cdd11": "onerestore"}


def get_protocol(name: str | Protocol, crop_border_override: int | None = None) -> Protocol:
    """A protocol by name (ValueError naming the known ones), optionally with another border."""
    if isinstance(name, Protocol):
        return name.with_border(crop_border_override)
    if name not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name].with_border(crop_border_override)


def average(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The unweighted mean over tasks of PSNR and SSIM (the papers' ``avg`` column)."""
    if not scores:
        raise ValueError("no tasks to average")
    return {"psnr": float(np.mean([s["psnr"] for s in scores.values()])),
            "ssim": float(np.mean([s["ssim"] for s in scores.values()]))}

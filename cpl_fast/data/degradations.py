"""Deterministic synthesis of image degradations.

Every function takes an **(H, W, 3) float RGB array in [0, 1]** (HWC, float32 or float64; the dtype
is kept) and a ``numpy.random.Generator``; all randomness comes from that generator, so one seed per
image gives the same degraded image on every machine and in every worker.

Two families:

* **PromptIR noise** (``noise_promptir``): the three-task benchmarks' test protocol. ``randn * sigma``
  is added to the uint8 image, clipped to [0, 255] and cast with ``astype(uint8)`` (truncation, not
  rounding), so the noisy input is quantised. ``noise_float`` is the unquantised, unclipped variant
  (Restormer's protocol).
* **MiOIR's seven tasks** (``sr``, ``blur``, ``noise``, ``jpeg``, ``rain``, ``haze``, ``dark``) with
  the in-distribution and out-of-distribution parameter sets of ``PARAMETER_RANGES``. Each output is
  rounded to 8-bit levels (``quantise=True``) because MiOIR stores its degraded sets as PNG files.
  Differences from MiOIR's scripts, all deliberate: SR downsamples with Pillow's bicubic (antialiased,
  like MATLAB's ``imresize``) instead of receiving a separate LR file; JPEG uses Pillow's encoder
  (libjpeg, 4:2:0) instead of DiffJPEG, so the same quality gives similar but not identical
  artefacts; rain streaks are rendered with numpy re-implementations of the OpenCV calls MiOIR uses;
  haze needs a depth map and, when none is given, uses the smooth synthetic one of
  :func:`synthetic_depth` (MiOIR uses a monocular depth estimate stored in ``.mat`` files).
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

Degradation = Callable[..., np.ndarray]

MIO_TASKS = ("sr", "blur", "noise", "jpeg", "rain", "haze", "dark")
PROMPTIR_SIGMAS = (15, 25, 50)

# MiOIR's sampling ranges (data_script/add_MiO_*_degradation.py). Continuous ranges are (low, high)
# for a uniform draw; ``rain_amount`` is an integer range [low, high).
PARAMETER_RANGES: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "blur": {"id": {"sigma": (1.0, 3.0)}, "ood": {"sigma": (3.0, 5.0)}},
    "noise": {"id": {"sigma": (15.0, 50.0)}, "ood": {"sigma": (50.0, 70.0)}},
    "jpeg": {"id": {"quality": (30.0, 70.0)}, "ood": {"quality": (10.0, 30.0)}},
    "rain": {"id": {"amount": (50, 100)}, "ood": {"amount": (100, 150)}},
    "haze": {"id": {"A": (0.8, 1.0), "beta": (0.5, 2.5)}, "ood": {"A": (0.8, 1.0), "beta": (2.5, 3.0)}},
    "dark": {"id": {"gamma": (1.0, 3.0)}, "ood": {"gamma": (3.0, 4.0)}},
}
BLUR_KERNEL_SIZES = tuple(range(7, 22, 2))
RAIN_WIDTHS = (3, 5, 7, 9, 11)
RAIN_LENGTH_RANGE = (20, 40)  # inclusive
RAIN_ANGLE_RANGE = (-45, 45)  # [low, high)

# OpenCV's fixed Gaussian kernels for ksize <= 7 when sigma <= 0 (used by the rain streak kernel).
_CV_SMALL_GAUSSIAN = {
    1: [1.0],
    3: [0.25, 0.5, 0.25],
    5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
}


# --------------------------------------------------------------------------------------- helpers

def check_image(img: Any, what: str = "image") -> None:
    """Raise a clear error unless ``img`` is an (H, W, 3) finite float array in [0, 1]."""
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{what} must be a numpy array (H, W, 3), got {type(img).__name__}")
    if img.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} must be float32 or float64 in [0, 1], got dtype {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{what} must have shape (H, W, 3) (HWC RGB), got {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{what} values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def quantise(img: np.ndarray) -> np.ndarray:
    """Round to the nearest 8-bit level (``round(x * 255) / 255``), keeping the dtype."""
    return (np.round(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(img.dtype)


def _range_set(name: str, ood: bool) -> Mapping[str, tuple[float, float]]:
    if name not in PARAMETER_RANGES:
        if ood:
            raise ValueError(f"degradation {name!r} has no out-of-distribution parameter set")
        return {}
    return PARAMETER_RANGES[name]["ood" if ood else "id"]


def _pad_reflect101(x: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """Reflect padding without repeating the edge (OpenCV's BORDER_REFLECT_101, torch's 'reflect')."""
    pad = [(top, bottom), (left, right)] + [(0, 0)] * (x.ndim - 2)
    if max(x.shape[0], x.shape[1]) == 1:
        return np.pad(x, pad, mode="edge")  # a single pixel has nothing to reflect
    return np.pad(x, pad, mode="reflect")


def correlate2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation of an (H, W) or (H, W, C) array with reflect-101 borders (``cv2.filter2D``).

    The anchor is the kernel centre ``(kh // 2, kw // 2)`` as in OpenCV, also for even sizes.
    Computed with an FFT so that long rain-streak kernels stay fast.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or kernel.size == 0:
        raise ValueError(f"kernel must be a non-empty 2-D array, got shape {kernel.shape}")
    kh, kw = kernel.shape
    h, w = x.shape[:2]
    padded = _pad_reflect101(x.astype(np.float64), kh // 2, kh - 1 - kh // 2, kw // 2, kw - 1 - kw // 2)
    fh, fw = padded.shape[0] + kh - 1, padded.shape[1] + kw - 1
    flipped = kernel[::-1, ::-1]
    spec_x = np.fft.rfft2(padded, s=(fh, fw), axes=(0, 1))
    spec_k = np.fft.rfft2(flipped, s=(fh, fw))
    if x.ndim == 3:
        spec_k = spec_k[:, :, None]
    full = np.fft.irfft2(spec_x * spec_k, s=(fh, fw), axes=(0, 1))
    return full[kh - 1:kh - 1 + h, kw - 1:kw - 1 + w]


def _separable_filter(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Apply the same symmetric 1-D filter along H and W with reflect-101 borders."""
    r = len(taps) // 2
    h, w = img.shape[:2]
    x = _pad_reflect101(img.astype(np.float64), r, r, 0, 0)
    rows = sum(t * x[i:i + h] for i, t in enumerate(taps))
    x = _pad_reflect101(rows, 0, 0, r, r)
    return sum(t * x[:, i:i + w] for i, t in enumerate(taps))


def gaussian_kernel1d(kernel_size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps; the outer product is BasicSR's isotropic ``bivariate_Gaussian``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    ax = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    g = np.exp(-0.5 * ax ** 2 / sigma ** 2)
    return g / g.sum()


def _pil_resize_float(img: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of each channel in Pillow's 32-bit float mode (no 8-bit rounding in between)."""
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32), mode="F")
                           .resize(size_wh, Image.BICUBIC)) for c in range(img.shape[2])]
    return np.stack(channels, axis=2)


# ---------------------------------------------------------------------------------- degradations

def noise_promptir(img: np.ndarray, rng: np.random.Generator, *, sigma: float | None = None,
                   ood: bool = False) -> np.ndarray:
    """PromptIR's quantised Gaussian noise: ``clip(u8 + randn * sigma, 0, 255).astype(uint8) / 255``.

    ``sigma`` is on the 0-255 scale; when omitted it is drawn from PromptIR's training set {15, 25, 50}.
    The image is first rounded to uint8 (exact for images read from 8-bit files).
    """
    check_image(img)
    _range_set("noise_promptir", ood)
    if sigma is None:
        sigma = float(rng.choice(PROMPTIR_SIGMAS))
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    u8 = np.round(img.astype(np.float64) * 255.0)
    noisy = np.clip(u8 + rng.standard_normal(img.shape) * sigma, 0, 255).astype(np.uint8)
    return (noisy / 255.0).astype(img.dtype)


def noise_float(img: np.ndarray, rng: np.random.Generator, *, sigma: float | None = None,
                clip: bool = False, ood: bool = False) -> np.ndarray:
    """Float Gaussian noise ``img + randn * sigma / 255`` (Restormer's protocol: no clip by default).

    Without clipping the output may leave [0, 1]. ``sigma`` defaults to a draw from {15, 25, 50}.
    """
    check_image(img)
    _range_set("noise_float", ood)
    if sigma is None:
        sigma = float(rng.choice(PROMPTIR_SIGMAS))
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    out = img.astype(np.float64) + rng.standard_normal(img.shape) * (sigma / 255.0)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return out.astype(img.dtype)


def sr(img: np.ndarray, rng: np.random.Generator, *, scale: int = 4, quantise_output: bool = True,
       ood: bool = False) -> np.ndarray:
    """Super-resolution input: bicubic downscale by ``scale`` then bicubic back to the input size.

    Pillow's bicubic (a = -0.5, antialiased when shrinking) in float mode; the output has the input's
    size. Deterministic: ``rng`` is accepted for the common signature and not used.
    """
    check_image(img)
    _range_set("sr", ood)
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    h, w = img.shape[:2]
    if h < scale or w < scale:
        raise ValueError(f"image {h}x{w} is smaller than the SR scale {scale}")
    low = _pil_resize_float(img, (w // scale, h // scale))
    out = np.clip(_pil_resize_float(low, (w, h)), 0.0, 1.0).astype(img.dtype)
    return quantise(out) if quantise_output else out


def blur(img: np.ndarray, rng: np.random.Generator, *, kernel_size: int | None = None,
         sigma: float | None = None, ood: bool = False, quantise_output: bool = True) -> np.ndarray:
    """Isotropic Gaussian blur; kernel size drawn from {7, 9, ..., 21}, sigma ~ U(1, 3) (OOD: U(3, 5)).

    Reflect-101 borders, like BasicSR's ``filter2D`` that MiOIR uses.
    """
    check_image(img)
    ranges = _range_set("blur", ood)
    if kernel_size is None:
        kernel_size = int(rng.choice(BLUR_KERNEL_SIZES))
    if sigma is None:
        sigma = round(float(rng.uniform(*ranges["sigma"])), 2)
    out = np.clip(_separable_filter(img, gaussian_kernel1d(kernel_size, sigma)), 0.0, 1.0).astype(img.dtype)
    return quantise(out) if quantise_output else out


def noise(img: np.ndarray, rng: np.random.Generator, *, sigma: float | None = None, ood: bool = False,
          quantise_output: bool = True) -> np.ndarray:
    """MiOIR's colour Gaussian noise, clipped; sigma = round(U(15, 50)) (OOD: U(50, 70)), 0-255 scale."""
    check_image(img)
    ranges = _range_set("noise", ood)
    if sigma is None:
        sigma = float(round(float(rng.uniform(*ranges["sigma"]))))
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    out = np.clip(img.astype(np.float64) + rng.standard_normal(img.shape) * (sigma / 255.0), 0.0, 1.0)
    out = out.astype(img.dtype)
    return quantise(out) if quantise_output else out


def jpeg(img: np.ndarray, rng: np.random.Generator, *, quality: int | None = None,
         ood: bool = False) -> np.ndarray:
    """JPEG compression with Pillow (libjpeg, 4:2:0); quality = round(U(30, 70)) (OOD: U(10, 30)).

    MiOIR uses DiffJPEG; libjpeg gives similar, not identical, artefacts at the same quality.
    """
    check_image(img)
    ranges = _range_set("jpeg", ood)
    if quality is None:
        quality = int(round(float(rng.uniform(*ranges["quality"]))))
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    u8 = np.round(np.clip(img, 0, 1) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return (np.asarray(decoded.convert("RGB"), dtype=np.float64) / 255.0).astype(img.dtype)


def _cv_gaussian_taps(ksize: int) -> np.ndarray:
    """Taps of ``cv2.GaussianBlur(k, (ksize, ksize), 0)``: fixed tables up to 7, else sigma from ksize."""
    if ksize in _CV_SMALL_GAUSSIAN:
        return np.asarray(_CV_SMALL_GAUSSIAN[ksize])
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    ax = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    g = np.exp(-ax ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def streak_kernel(length: int, angle: float, width: int) -> np.ndarray:
    """Motion kernel of one rain streak, as MiOIR builds it with OpenCV.

    A ``length x length`` identity matrix (a 45-degree line) is rotated by ``angle - 45`` degrees and
    scaled by ``1 - length / 100`` about ``(length / 2, length / 2)`` (``cv2.getRotationMatrix2D`` +
    ``cv2.warpAffine``, bilinear, zero outside), then widened by a ``width x width`` Gaussian blur.
    Not normalised: the streak layer is min-max normalised afterwards.
    """
    if length < 1:
        raise ValueError(f"streak length must be >= 1, got {length}")
    if width < 1 or width % 2 == 0:
        raise ValueError(f"streak width must be a positive odd integer, got {width}")
    src = np.eye(length)
    theta = math.radians(angle - 45)
    scale = 1 - length / 100.0
    a, b = scale * math.cos(theta), scale * math.sin(theta)
    c = length / 2
    fwd = np.array([[a, b, (1 - a) * c - b * c], [-b, a, b * c + (1 - a) * c]])
    inv = np.linalg.inv(np.vstack([fwd, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:length, 0:length].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    kernel = np.zeros((length, length))
    corners = ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy))
    for dy, dx, wgt in corners:
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < length) & (xx >= 0) & (xx < length)
        kernel[inside] += wgt[inside] * src[yy[inside], xx[inside]]
    return _separable_filter(kernel, _cv_gaussian_taps(width))


def rain_layer(height: int, width: int, rng: np.random.Generator, *, amount: int, streak_width: int,
               length: int, angle: float) -> np.ndarray:
    """(H, W) streak layer in [0, 1] on 8-bit levels: sparse seeds, smeared along the streak kernel.

    Seeds: ``U(0, 256)`` values below ``256 - amount / 100`` are zeroed (about ``amount / 25600`` of the
    pixels survive), spread by a small cross kernel, then correlated with :func:`streak_kernel`;
    the result is min-max normalised to [0, 255] and truncated to uint8, as in MiOIR.
    """
    seeds = rng.uniform(0, 256, (height, width))
    seeds[seeds < 256 - amount * 0.01] = 0
    cross = np.array([[0, 0.1, 0], [0.1, 8, 0.1], [0, 0.1, 0]])
    seeds = correlate2d(seeds, cross)
    streaks = correlate2d(seeds, streak_kernel(length, angle, streak_width))
    lo, hi = streaks.min(), streaks.max()
    if hi - lo <= 1e-12:  # no seed survived (tiny image): no rain
        return np.zeros((height, width))
    return np.floor((streaks - lo) / (hi - lo) * 255.0 + 1e-9).clip(0, 255) / 255.0


def rain(img: np.ndarray, rng: np.random.Generator, *, amount: int | None = None, width: int | None = None,
         length: int | None = None, angle: float | None = None, ood: bool = False,
         quantise_output: bool = True) -> np.ndarray:
    """Synthetic rain streaks added to the image and clipped.

    amount ~ U{50..99} (OOD: U{100..149}), width in {3, 5, 7, 9, 11}, length ~ U{20..40},
    angle ~ U{-45..44} degrees: MiOIR's integer draws.
    """
    check_image(img)
    ranges = _range_set("rain", ood)
    if amount is None:
        amount = int(rng.integers(*ranges["amount"]))
    if width is None:
        width = int(rng.choice(RAIN_WIDTHS))
    if length is None:
        length = int(rng.integers(RAIN_LENGTH_RANGE[0], RAIN_LENGTH_RANGE[1] + 1))
    if angle is None:
        angle = int(rng.integers(*RAIN_ANGLE_RANGE))
    if amount < 0:
        raise ValueError(f"rain amount must be >= 0, got {amount}")
    layer = rain_layer(img.shape[0], img.shape[1], rng, amount=amount, streak_width=width, length=length,
                       angle=angle)
    out = np.clip(img.astype(np.float64) + layer[:, :, None], 0.0, 1.0).astype(img.dtype)
    return quantise(out) if quantise_output else out


def synthetic_depth(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth (H, W) depth map in (0, 1] for haze when no real depth is available.

    Outdoor photographs are usually far at the top and near at the bottom, so the map is a vertical
    ramp (1 at the top row, 0.2 at the bottom) mixed 70/30 with a smooth random field (a 4 x 4
    uniform grid upsampled bicubically), then divided by its maximum.
    """
    if height < 1 or width < 1:
        raise ValueError(f"depth size must be positive, got {height}x{width}")
    ramp = 1.0 - 0.8 * (np.arange(height, dtype=np.float64) / max(height - 1, 1))
    grid = rng.uniform(0.0, 1.0, (4, 4)).astype(np.float32)
    field = Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC)
    field = np.asarray(field, dtype=np.float64)
    depth = np.clip(0.7 * ramp[:, None] + 0.3 * field, 0.05, None)
    return depth / depth.max()


def haze(img: np.ndarray, rng: np.random.Generator, *, A: float | None = None, beta: float | None = None,
         depth: np.ndarray | None = None, ood: bool = False, quantise_output: bool = True) -> np.ndarray:
    """Atmospheric scattering model ``I t + A (1 - t)``, ``t = exp(-beta d / max d)``.

    A ~ U(0.8, 1), beta ~ U(0.5, 2.5) (OOD: U(2.5, 3)), both rounded to 2 decimals as in MiOIR.
    ``depth`` is an (H, W) non-negative map; without one, :func:`synthetic_depth` is used.
    """
    check_image(img)
    ranges = _range_set("haze", ood)
    if A is None:
        A = round(float(rng.uniform(*ranges["A"])), 2)
    if beta is None:
        beta = round(float(rng.uniform(*ranges["beta"])), 2)
    h, w = img.shape[:2]
    if depth is None:
        depth = synthetic_depth(h, w, rng)
    depth = np.asarray(depth, dtype=np.float64)
    if depth.shape != (h, w):
        raise ValueError(f"depth must have shape {(h, w)} (the image's H, W), got {depth.shape}")
    if not np.isfinite(depth).all() or depth.min() < 0 or depth.max() <= 0:
        raise ValueError("depth must be finite, non-negative and not all zero")
    t = np.exp(-beta * depth / depth.max())[:, :, None]
    out = np.clip(img.astype(np.float64) * t + A * (1.0 - t), 0.0, 1.0).astype(img.dtype)
    return quantise(out) if quantise_output else out


def dark(img: np.ndarray, rng: np.random.Generator, *, gamma: float | None = None, ood: bool = False,
         quantise_output: bool = True) -> np.ndarray:
    """Low light by a gamma curve ``I ** gamma``, gamma ~ U(1, 3) (OOD: U(3, 4)), rounded to 2 decimals."""
    check_image(img)
    ranges = _range_set("dark", ood)
    if gamma is None:
        gamma = round(float(rng.uniform(*ranges["gamma"])), 2)
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    out = np.power(np.clip(img.astype(np.float64), 0.0, 1.0), gamma).astype(img.dtype)
    return quantise(out) if quantise_output else out


DEGRADATIONS: dict[str, Degradation] = {
    "noise_promptir": noise_promptir,
    "noise_float": noise_float,
    "sr": sr,
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "rain": rain,
    "haze": haze,
    "dark": dark,
}


def make_rng(seed: int | Sequence[int]) -> np.random.Generator:
    """A PCG64 generator from an int or a sequence of non-negative ints (e.g. ``(seed, epoch, index)``)."""
    if isinstance(seed, (int, np.integer)):
        values = [seed]
    elif isinstance(seed, (tuple, list, np.ndarray)):
        values = list(seed)
    else:
        raise TypeError(f"seed must be an int or a sequence of ints, got {type(seed).__name__}")
    if not values or any(not isinstance(v, (int, np.integer)) or v < 0 for v in values):
        raise ValueError(f"seed must be a non-negative int or a non-empty sequence of them, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(v) for v in values]))


def degrade(img: np.ndarray, name: str, seed: int | Sequence[int], ood: bool = False,
            **params: Any) -> np.ndarray:
    """Apply the registered degradation ``name`` with a generator seeded by ``seed``.

    Parameters not given in ``params`` are drawn from the in-distribution set (``ood=False``) or
    the out-of-distribution set (``ood=True``); the same seed always gives the same output.
    """
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; known: {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[name](img, make_rng(seed), ood=ood, **params)

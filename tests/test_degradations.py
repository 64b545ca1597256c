"""Tests of cpl_fast.data.degradations: determinism, protocols, parameter ranges, input checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cpl_fast.data import degradations as D
from cpl_fast.data.degradations import DEGRADATIONS, PARAMETER_RANGES, degrade, make_rng


def _image(seed: int = 0, h: int = 48, w: int = 56, dtype=np.float64) -> np.ndarray:
    """A random image on 8-bit levels (what images read from files are)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (h, w, 3)) / 255.0).astype(dtype)


def _mid_grey(seed: int = 0, h: int = 96, w: int = 96) -> np.ndarray:
    """A random image far from 0 and 1, so clipping does not bias noise statistics."""
    rng = np.random.default_rng(seed)
    return (rng.integers(110, 146, (h, w, 3)) / 255.0).astype(np.float64)


# ------------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_same_seed_same_output_and_shape_dtype_kept(name):
    img = _image(1)
    a, b = degrade(img, name, 123), degrade(img.copy(), name, 123)
    np.testing.assert_array_equal(a, b)
    assert a.shape == img.shape
    for dtype in (np.float32, np.float64):
        assert degrade(img.astype(dtype), name, 5).dtype == dtype
    if name != "noise_float":  # the float protocol does not clip
        assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("name", sorted(set(DEGRADATIONS) - {"sr"}))
def test_different_seeds_differ(name):
    img = _image(2)
    assert not np.array_equal(degrade(img, name, 1), degrade(img, name, 2))


def test_sr_ignores_the_seed():
    img = _image(3)
    np.testing.assert_array_equal(degrade(img, "sr", 1), degrade(img, "sr", 2))


def test_make_rng_accepts_tuples_and_rejects_negatives():
    a = make_rng((1, 2, 3)).random(4)
    np.testing.assert_array_equal(a, make_rng([1, 2, 3]).random(4))
    assert not np.array_equal(a, make_rng((1, 2, 4)).random(4))
    for bad in (-1, (1, -2), (), ("7",), (1.5,)):
        with pytest.raises(ValueError, match="seed"):
            make_rng(bad)
    for bad in ("7", 1.5, None):
        with pytest.raises(TypeError, match="seed"):
            make_rng(bad)


# ------------------------------------------------------------------------------------------- noise

def test_promptir_noise_matches_the_protocol_by_hand():
    img = _image(4)
    sigma = 25
    out = D.noise_promptir(img, make_rng(9), sigma=sigma)
    u8 = np.round(img * 255)
    expected = np.clip(u8 + make_rng(9).standard_normal(img.shape) * sigma, 0, 255).astype(np.uint8) / 255.0
    np.testing.assert_array_equal(out, expected)
    levels = out * 255
    np.testing.assert_array_equal(levels, np.round(levels))  # uint8-valued


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_promptir_noise_statistics(sigma):
    img = _mid_grey(5)
    diff = (D.noise_promptir(img, make_rng(sigma), sigma=sigma) - img) * 255
    # Truncation by astype(uint8) lowers the mean by about half a level.
    assert diff.mean() == pytest.approx(-0.5, abs=0.15 + sigma / 150)
    assert diff.std() == pytest.approx(math.sqrt(sigma ** 2 + 1 / 12), rel=0.03)


def test_promptir_noise_default_sigma_is_a_promptir_one():
    img = _mid_grey(6)
    for seed in range(4):
        std = ((D.noise_promptir(img, make_rng(seed)) - img) * 255).std()
        assert min(abs(std - s) for s in (15, 25, 50)) < 1.5


def test_float_noise_statistics_and_no_clip():
    img = _mid_grey(7)
    diff = (D.noise_float(img, make_rng(1), sigma=30) - img) * 255
    assert diff.mean() == pytest.approx(0, abs=0.3)
    assert diff.std() == pytest.approx(30, rel=0.03)
    bright = np.full((32, 32, 3), 0.98)
    assert D.noise_float(bright, make_rng(1), sigma=30).max() > 1
    assert D.noise_float(bright, make_rng(1), sigma=30, clip=True).max() <= 1


@pytest.mark.parametrize("ood,lo,hi", [(False, 15, 50), (True, 50, 70)])
def test_mio_noise_sigma_range(ood, lo, hi):
    img = _mid_grey(8)
    for seed in range(6):
        out = D.noise(img, make_rng(seed), ood=ood, quantise_output=False)
        assert lo - 1.5 <= ((out - img) * 255).std() <= hi + 1.5


# ---------------------------------------------------------------------------------------------- SR

def test_sr_keeps_size_and_constants_and_smooth_images():
    img = _image(9, 50, 37)
    assert D.sr(img, make_rng(0)).shape == img.shape
    const = np.full((40, 44, 3), 0.4)
    np.testing.assert_allclose(D.sr(const, make_rng(0), quantise_output=False), 0.4, atol=1e-6)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    smooth = np.stack([0.2 + 0.6 * xx, 0.2 + 0.6 * yy, 0.5 + 0.2 * xx * yy], axis=2)
    out = D.sr(smooth, make_rng(0), quantise_output=False)
    assert np.abs(out - smooth)[8:-8, 8:-8].max() < 0.01  # linear ramps survive bicubic round trips
    assert np.abs(D.sr(img, make_rng(0)) - img).mean() > 0.05  # random texture does not


def test_sr_rejects_images_smaller_than_the_scale():
    with pytest.raises(ValueError, match="smaller than the SR scale"):
        D.sr(_image(0, 3, 10), make_rng(0))
    with pytest.raises(ValueError, match="scale"):
        D.sr(_image(0), make_rng(0), scale=0)


# -------------------------------------------------------------------------------------------- blur

def _direct_filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Slow oracle: 2-D correlation with reflect-101 borders, anchor at (kh // 2, kw // 2)."""
    kh, kw = kernel.shape
    pad = [(kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(img, pad, mode="reflect")
    out = np.zeros_like(img, dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * p[i:i + img.shape[0], j:j + img.shape[1]]
    return out


def test_blur_matches_a_direct_2d_gaussian_filter():
    img = _image(10, 30, 33)
    g = D.gaussian_kernel1d(9, 1.7)
    out = D.blur(img, make_rng(0), kernel_size=9, sigma=1.7, quantise_output=False)
    np.testing.assert_allclose(out, np.clip(_direct_filter(img, np.outer(g, g)), 0, 1), atol=1e-12)


def test_blur_kernel_and_behaviour():
    g = D.gaussian_kernel1d(7, 1.0)
    assert g.sum() == pytest.approx(1.0) and np.allclose(g, g[::-1]) and g.argmax() == 3
    const = np.full((20, 20, 3), 0.7)
    np.testing.assert_allclose(D.blur(const, make_rng(1), quantise_output=False), 0.7, atol=1e-12)
    img = _image(11)
    assert D.blur(img, make_rng(1)).std() < 0.6 * img.std()
    for bad in ({"kernel_size": 8, "sigma": 1.0}, {"kernel_size": 7, "sigma": 0.0}):
        with pytest.raises(ValueError):
            D.blur(img, make_rng(0), **bad)


@pytest.mark.parametrize("shape", [(5, 7), (12, 9), (1, 6)])
def test_correlate2d_matches_direct(shape):
    rng = np.random.default_rng(12)
    x = rng.random((20, 17))
    k = rng.standard_normal(shape)
    np.testing.assert_allclose(D.correlate2d(x, k), _direct_filter(x, k), atol=1e-10)
    x3 = rng.random((15, 18, 3))
    np.testing.assert_allclose(D.correlate2d(x3, k), _direct_filter(x3, k), atol=1e-10)


# -------------------------------------------------------------------------------------------- JPEG

def test_jpeg_quality_and_levels():
    img = _image(13, 64, 64)
    lo, hi = D.jpeg(img, make_rng(0), quality=10), D.jpeg(img, make_rng(0), quality=90)
    assert np.abs(lo - img).mean() > np.abs(hi - img).mean()
    np.testing.assert_array_equal(lo * 255, np.round(lo * 255))
    with pytest.raises(ValueError, match="quality"):
        D.jpeg(img, make_rng(0), quality=0)


# -------------------------------------------------------------------------------------------- rain

def test_rain_only_adds_light_and_zero_amount_adds_none():
    img = _image(14, 64, 64)
    out = D.rain(img, make_rng(3), quantise_output=False)
    assert (out >= img - 1e-12).all() and (out > img + 0.1).mean() > 0.005
    np.testing.assert_array_equal(D.rain(img, make_rng(3), amount=0), img)


def test_rain_layer_is_on_8bit_levels_and_spans_full_range():
    layer = D.rain_layer(64, 64, make_rng(2), amount=80, streak_width=3, length=25, angle=10)
    np.testing.assert_array_equal(layer * 255, np.round(layer * 255))
    assert layer.min() == 0 and layer.max() == 1


def test_streak_kernel_direction():
    vertical = D.streak_kernel(21, 0, 1)  # angle 0: a vertical streak through the centre
    cols = vertical.sum(axis=0)
    assert cols[9:12].sum() > 0.95 * cols.sum()
    slanted = D.streak_kernel(21, -45, 1)  # -45 degrees: the anti-diagonal
    anti = sum(slanted[i, 20 - i] + (slanted[i, 21 - i] if i > 0 else 0) for i in range(21))
    assert anti > 0.8 * slanted.sum()
    np.testing.assert_allclose(D.streak_kernel(21, 30, 5), D.streak_kernel(21, 30, 5))
    with pytest.raises(ValueError, match="width"):
        D.streak_kernel(21, 0, 4)


# -------------------------------------------------------------------------------------------- haze

def test_haze_formula_on_a_constant_image():
    img = np.full((24, 30, 3), 0.3)
    depth = np.random.default_rng(15).uniform(0.1, 5.0, (24, 30))
    out = D.haze(img, make_rng(0), A=0.9, beta=1.5, depth=depth, quantise_output=False)
    t = np.exp(-1.5 * depth / depth.max())
    np.testing.assert_allclose(out, (0.3 * t + 0.9 * (1 - t))[:, :, None].repeat(3, 2), atol=1e-12)
    q = D.haze(img, make_rng(0), A=0.9, beta=1.5, depth=depth)
    assert np.abs(q - out).max() <= 0.5 / 255 + 1e-9


@pytest.mark.parametrize("ood", [False, True])
def test_haze_sampled_parameters_lie_in_their_ranges(ood):
    img = np.empty((4, 4, 3))
    img[:, :2], img[:, 2:] = 0.2, 0.6
    for seed in range(8):
        out = D.haze(img, make_rng(seed), depth=np.ones((4, 4)), ood=ood, quantise_output=False)
        t = (out[0, 0, 0] - out[0, 3, 0]) / (0.2 - 0.6)
        a = (out[0, 0, 0] - 0.2 * t) / (1 - t)
        ranges = PARAMETER_RANGES["haze"]["ood" if ood else "id"]
        assert ranges["beta"][0] - 1e-9 <= -math.log(t) <= ranges["beta"][1] + 1e-9
        assert ranges["A"][0] - 1e-9 <= a <= ranges["A"][1] + 1e-9


def test_synthetic_depth_is_smooth_deterministic_and_normalised():
    d = D.synthetic_depth(40, 50, make_rng(1))
    assert d.shape == (40, 50) and d.max() == pytest.approx(1.0) and d.min() > 0
    np.testing.assert_array_equal(d, D.synthetic_depth(40, 50, make_rng(1)))
    assert np.abs(np.diff(d, axis=0)).max() < 0.1 and np.abs(np.diff(d, axis=1)).max() < 0.1
    assert d[:5].mean() > d[-5:].mean()  # far at the top


def test_haze_rejects_bad_depth():
    img = _image(16, 8, 8)
    for bad in (np.ones((8, 9)), np.zeros((8, 8)), -np.ones((8, 8))):
        with pytest.raises(ValueError, match="depth"):
            D.haze(img, make_rng(0), depth=bad)


# -------------------------------------------------------------------------------------------- dark

def test_dark_is_a_gamma_curve_with_sampled_gamma_in_range():
    img = _image(17)
    out = D.dark(img, make_rng(0), gamma=2.2, quantise_output=False)
    np.testing.assert_allclose(out, img ** 2.2, atol=1e-15)
    half = np.full((4, 4, 3), 0.5)
    for ood, (lo, hi) in ((False, (1, 3)), (True, (3, 4))):
        for seed in range(6):
            out = D.dark(half, make_rng(seed), ood=ood, quantise_output=False)
            g = math.log(out[0, 0, 0]) / math.log(0.5)
            assert lo - 1e-9 <= g <= hi + 1e-9
            assert g == pytest.approx(round(g, 2))


# ---------------------------------------------------------------------------------------- OOD, errors

@pytest.mark.parametrize("name", ["blur", "noise", "jpeg", "rain", "haze", "dark"])
def test_ood_differs_from_in_distribution(name):
    img = _image(18, 64, 64)
    ind = [degrade(img, name, s) for s in range(3)]
    ood = [degrade(img, name, s, ood=True) for s in range(3)]
    for a, b in zip(ind, ood, strict=True):
        assert not np.array_equal(a, b)
    # OOD is stronger on average for every MiOIR degradation.
    err = lambda outs: np.mean([np.abs(o - img).mean() for o in outs])  # noqa: E731
    assert err(ood) > err(ind)


@pytest.mark.parametrize("name", ["sr", "noise_promptir", "noise_float"])
def test_ood_without_an_ood_set_raises(name):
    with pytest.raises(ValueError, match="out-of-distribution"):
        degrade(_image(0), name, 0, ood=True)


def test_bad_inputs_raise_clear_errors():
    img = _image(19)
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(img, "fog", 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        degrade((img * 255).astype(np.uint8), "blur", 0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        degrade(np.ascontiguousarray(img.transpose(2, 0, 1)), "blur", 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(img * 2, "noise", 0)
    nan = img.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        degrade(nan, "dark", 0)
    with pytest.raises(TypeError, match="numpy array"):
        degrade(img.tolist(), "dark", 0)

"""Metrics and protocols against scikit-image and independent re-implementations of BasicSR and PromptIR."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cpl_fast.eval import PROTOCOLS, crop_border, get_protocol, psnr, quantize, rgb_to_y, ssim


def _pair(h: int = 37, w: int = 53, noise: float = 0.08,
          seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.random((h, w, 3))
    restored = np.clip(target + noise * rng.standard_normal((h, w, 3)), 0, 1)
    return restored, target


def _hwc_to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


# Independent re-implementations of the reference code the protocols follow.

def promptir_crop_img(image: np.ndarray, base: int = 16) -> np.ndarray:
    """PromptIR's utils/image_utils.py crop_img."""
    h, w = image.shape[0], image.shape[1]
    crop_h, crop_w = h % base, w % base
    return image[crop_h // 2:h - crop_h + crop_h // 2, crop_w // 2:w - crop_w + crop_w // 2, :]


def basicsr_y(img_uint8_levels: np.ndarray) -> np.ndarray:
    """basicsr.metrics.metric_util.to_y_channel on an RGB image of 8-bit levels (float)."""
    img = img_uint8_levels.astype(np.float32) / 255.0
    y = np.dot(img, [65.481, 128.553, 24.966]) + 16.0
    return (y / 255.0)[..., None] * 255.0


def basicsr_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10.0 * math.log10(255.0 ** 2 / mse)


def basicsr_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """basicsr.metrics.psnr_ssim.calculate_ssim: 11x11 Gaussian (1.5), valid filtering, mean of channels."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = np.arange(11) - 5
    g = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    window = np.outer(g, g)
    values = []
    for c in range(a.shape[2]):
        img, img2 = a[..., c].astype(np.float64), b[..., c].astype(np.float64)

        def filt(z):
            return convolve2d(z, window, mode="valid")

        mu1, mu2 = filt(img), filt(img2)
        s1, s2, s12 = filt(img ** 2) - mu1 ** 2, filt(img2 ** 2) - mu2 ** 2, filt(img * img2) - mu1 * mu2
        ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


# ----------------------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("shape", [(37, 53), (64, 48), (17, 90)])
def test_psnr_and_ssim_equal_scikit_image_on_random_images(shape):
    restored, target = _pair(*shape)
    assert psnr(restored, target) == pytest.approx(peak_signal_noise_ratio(target, restored, data_range=1.0),
                                                   rel=1e-12)
    assert ssim(restored, target) == pytest.approx(
        structural_similarity(target, restored, data_range=1.0, channel_axis=2), rel=1e-12)
    # Tensors (3, H, W) and arrays give the same numbers.
    assert psnr(_hwc_to_tensor(restored), _hwc_to_tensor(target)) == pytest.approx(psnr(restored, target))
    mse = np.mean((restored - target) ** 2)
    assert psnr(restored, target) == pytest.approx(10 * math.log10(1 / mse))


def test_psnr_clips_to_the_data_range_and_is_infinite_for_equal_images():
    restored, target = _pair()
    wild = restored + 0.5 * (np.random.default_rng().random(restored.shape) - 0.5)
    assert psnr(wild, target) == pytest.approx(psnr(np.clip(wild, 0, 1), target))
    assert psnr(target, target) == math.inf
    assert ssim(target, target) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(restored[:-1], target)
    with pytest.raises(ValueError, match="RGB image"):
        psnr(torch.rand(1, 8, 8), torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="unknown SSIM window"):
        ssim(restored, target, window="box")


def test_gaussian_ssim_equals_basicsr_calculate_ssim():
    restored, target = _pair(40, 45, noise=0.1)
    a, b = quantize(restored), quantize(target)
    ours = ssim(a, b, data_range=255.0, window="gaussian")
    assert ours == pytest.approx(basicsr_ssim(a, b), rel=1e-6)
    assert abs(ours - ssim(a, b, data_range=255.0, window="uniform")) > 1e-5  # the window matters


def test_y_channel_is_basicsr_and_scikit_image_luma():
    rgb = np.random.default_rng().random((21, 34, 3))
    y = rgb_to_y(rgb)
    assert y.shape == (21, 34, 1)
    np.testing.assert_allclose(y[..., 0], rgb2ycbcr(rgb)[..., 0], rtol=1e-12)
    np.testing.assert_allclose(y, basicsr_y(rgb * 255.0), rtol=1e-5)
    assert 16.0 <= y.min() and y.max() <= 235.0
    with pytest.raises(ValueError, match="RGB array"):
        rgb_to_y(rgb[..., :2])


def test_crop_border_and_quantize():
    image = np.random.default_rng().random((20, 30, 3))
    np.testing.assert_array_equal(crop_border(image, 4), image[4:-4, 4:-4])
    assert crop_border(image, 0) is image
    with pytest.raises(ValueError, match="leaves nothing"):
        crop_border(image, 10)
    with pytest.raises(ValueError, match=">= 0"):
        crop_border(image, -1)
    q = quantize(image)
    np.testing.assert_array_equal(q, np.round(image * 255))
    assert q.min() >= 0 and q.max() <= 255 and np.array_equal(q, np.round(q))


# --------------------------------------------------------------------------------------- protocols

def test_promptir_protocol_crops_to_16_and_scores_like_scikit_image():
    protocol = get_protocol("promptir")
    restored, target = _pair(37, 53)
    cropped = protocol.prepare(_hwc_to_tensor(target))
    expected_crop = promptir_crop_img(target)
    assert tuple(cropped.shape[-2:]) == expected_crop.shape[:2] == (32, 48)
    np.testing.assert_array_equal(cropped.permute(1, 2, 0).numpy(), expected_crop)
    r, t = promptir_crop_img(restored), promptir_crop_img(target)
    p, s = protocol.score(_hwc_to_tensor(r), _hwc_to_tensor(t))
    assert p == pytest.approx(peak_signal_noise_ratio(t, r, data_range=1.0), rel=1e-12)
    assert s == pytest.approx(structural_similarity(t, r, data_range=1.0, channel_axis=2), rel=1e-12)
    with pytest.raises(ValueError, match="smaller than its crop multiple"):
        protocol.prepare(torch.rand(3, 12, 40))


@pytest.mark.parametrize("border", [None, 3])
def test_basicsr_y_protocol_equals_basicsr(border):
    protocol = get_protocol("basicsr_y", border)
    restored, target = _pair(45, 38, noise=0.05)
    p, s = protocol.score(_hwc_to_tensor(restored), _hwc_to_tensor(target))
    a, b = basicsr_y(np.round(restored * 255)), basicsr_y(np.round(target * 255))
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    assert p == pytest.approx(basicsr_psnr(a, b), rel=1e-6)
    assert s == pytest.approx(basicsr_ssim(a, b), rel=1e-5)
    assert protocol.crop_border == (border or 0)
    assert protocol.prepare(torch.ones(3, 37, 53)).shape == (3, 37, 53)  # no crop to a multiple


def test_mioir_protocol_is_rgb_with_border_4():
    protocol = get_protocol("mioir")
    restored, target = _pair(40, 44, noise=0.06)
    p, s = protocol.score(restored, target)
    a, b = np.round(restored * 255)[4:-4, 4:-4], np.round(target * 255)[4:-4, 4:-4]
    assert p == pytest.approx(basicsr_psnr(a, b), rel=1e-9)
    assert s == pytest.approx(basicsr_ssim(a, b), rel=1e-5)
    # The border matters: scoring the whole image gives another number.
    assert p != pytest.approx(get_protocol("mioir", 0).score(restored, target)[0], rel=1e-6)


def test_protocol_registry_labels_and_errors():
    assert set(PROTOCOLS) >= {"promptir", "basicsr_y", "mioir"}
    assert "crop 16" in get_protocol("promptir").label and "Y" in get_protocol("basicsr_y").label
    assert "border 4" in get_protocol("mioir").label
    for protocol in PROTOCOLS.values():
        assert protocol.name in protocol.description
    with pytest.raises(ValueError, match="unknown metric protocol 'psnr_y'.*promptir"):
        get_protocol("psnr_y")
    with pytest.raises(ValueError, match="crop_border must be >= 0"):
        get_protocol("mioir", -2)

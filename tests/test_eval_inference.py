"""Any-size / any-channel / tiled / mixed-precision inference (cpl_fast.inference.restoration)."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpl_fast.eval import autocast, check_tiling, pad_to_multiple, restore_image, to_rgb
from cpl_fast.inference.restoration import AUTO_TILE, is_out_of_memory
from cpl_fast.models import build_model


class Pointwise(nn.Module):
    """A per-pixel network (1x1 convolutions): tiling must not change a single value."""

    size_multiple = 8

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 3, 1)

    def forward(self, x, routing=None, return_routing=False):
        y = x + self.b(F.gelu(self.a(x)))
        return (y, []) if return_routing else y


class LocalUNet(nn.Module):
    """A small U-Net of 3x3 convolutions (two strided halvings, transposed-conv upsampling, skips):
    a real restoration-shaped network whose receptive field is finite (radius well under 16 px)."""

    size_multiple = 4

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.d1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.d2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.u2 = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.u1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, routing=None, return_routing=False):
        e1 = F.gelu(self.c1(x))
        e2 = F.gelu(self.c2(F.gelu(self.d1(e1))))
        z = F.gelu(self.c3(F.gelu(self.d2(e2))))
        y = x + self.out(F.gelu(self.u1(F.gelu(self.u2(z)) + e2) + e1))
        return (y, []) if return_routing else y


class OutOfMemoryAbove(Pointwise):
    """Raises an out-of-memory error for inputs with more than ``limit`` pixels (a simulated GPU)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.calls = limit, []

    def forward(self, x, routing=None, return_routing=False):
        self.calls.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super().forward(x, routing, return_routing)


def _untiled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: pad to the model's multiple by hand, run, crop."""
    m = model.size_multiple
    h, w = x.shape[-2:]
    padded = F.pad(x[None], (0, (-w) % m, 0, (-h) % m), mode="reflect")
    with torch.no_grad():
        return model(padded)[..., :h, :w]


# ------------------------------------------------------------------------------- sizes, channels

@pytest.mark.parametrize("size", [(37, 53), (8, 8), (41, 16), (5, 3)])
def test_pad_to_multiple_reflects_and_crops_back_on_odd_sizes(size):
    x = torch.rand(1, 3, *size)
    padded, original = pad_to_multiple(x, 8)
    assert original == size and padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    torch.testing.assert_close(padded[..., :size[0], :size[1]], x, rtol=0, atol=0)
    reflect = (-size[0]) % 8 < size[0] and (-size[1]) % 8 < size[1]
    if reflect and size[0] % 8:  # reflected rows mirror the rows above the edge
        torch.testing.assert_close(padded[..., size[0], :size[1]], x[..., size[0] - 2, :], rtol=0, atol=0)
    elif not reflect:  # too short to reflect: the edge row is repeated
        torch.testing.assert_close(padded[..., -1, :size[1]], x[..., -1, :], rtol=0, atol=0)


@pytest.mark.parametrize("size", [(37, 53), (19, 8), (45, 31)])
def test_restore_image_any_size_with_a_real_model(size):
    model = build_model("tiny").eval()
    x = torch.rand(3, *size)
    result = restore_image(model, x)
    assert result.image.shape == (1, 3, *size) and result.tile is None and result.tiles == 1
    torch.testing.assert_close(result.image, _untiled(model, x), rtol=0, atol=0)
    assert len(result.routing) == model.num_prompt_levels and result.routing[0].indices.shape == (1, 1)


def test_grey_replicated_and_alpha_dropped_with_a_warning():
    grey = torch.rand(1, 9, 7)
    rgb = to_rgb(grey)
    assert rgb.shape == (3, 9, 7) and all(torch.equal(rgb[c], grey[0]) for c in range(3))
    rgba = torch.rand(1, 4, 9, 7)
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        out = to_rgb(rgba, "photo.png")
    assert torch.equal(out, rgba[:, :3])
    with pytest.warns(UserWarning, match="alpha"):
        grey_alpha = to_rgb(torch.rand(2, 5, 5))
    assert grey_alpha.shape == (3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_rgb(rgb) is rgb
    with pytest.raises(ValueError, match="channels"):
        to_rgb(torch.rand(5, 4, 4))
    # Through the model: a grey image is restored as RGB.
    model = Pointwise().double().eval()
    image = torch.rand(1, 21, 13, dtype=torch.float64)
    torch.testing.assert_close(restore_image(model, image).image, _untiled(model, image.expand(3, -1, -1)))


# -------------------------------------------------------------------------------------------- tiles

@pytest.mark.parametrize("size, tile, overlap", [((37, 53), 16, 8), ((70, 41), 24, 12), ((33, 90), 32, 0)])
def test_tiled_equals_untiled_exactly_for_a_pointwise_model(size, tile, overlap):
    model = Pointwise().double().eval()
    x = torch.rand(3, *size, dtype=torch.float64)
    result = restore_image(model, x, tile=tile, overlap=overlap)
    assert result.tiles > 1 and result.tile == tile
    torch.testing.assert_close(result.image, _untiled(model, x), rtol=0, atol=1e-13)


def test_tiled_equals_untiled_for_a_local_unet_when_its_receptive_field_fits_the_overlap():
    model = LocalUNet().eval()
    x = torch.rand(3, 150, 130)
    reference = _untiled(model, x)
    tiled = restore_image(model, x, tile=96, overlap=64)  # used from 16 px inside each inner edge
    assert tiled.tiles == 9
    torch.testing.assert_close(tiled.image, reference, rtol=1e-5, atol=1e-5)
    # With a small overlap the tile edges do show: the comparison above is not vacuous.
    coarse = restore_image(model, x, tile=48, overlap=4)
    assert (coarse.image - reference).abs().max() > 1e-3


def test_tiles_as_large_as_the_image_change_nothing_for_promptir():
    model = build_model("tiny").eval()
    x = torch.rand(3, 37, 53)
    whole = restore_image(model, x)
    one_tile = restore_image(model, x, tile=64, overlap=32)
    assert one_tile.tiles == 1
    assert torch.equal(one_tile.image, whole.image)
    tiled = restore_image(model, x, tile=32, overlap=16)  # PromptIR routes per tile: an approximation
    assert tiled.image.shape == whole.image.shape and torch.isfinite(tiled.image).all()
    assert tiled.routing[0].indices.shape[0] == tiled.tiles > 1


@pytest.mark.parametrize("tile, overlap, message", [
    (64, 64, "must be smaller than the tile"),
    (64, 80, "must be smaller than the tile"),
    (60, 8, "not a multiple of the model's size multiple 8"),
    (16, 12, "at least the model's size multiple"),
    (0, 0, "positive integer"),
    (32, -1, ">= 0"),
])
def test_bad_tiling_is_refused_with_a_clear_message(tile, overlap, message):
    with pytest.raises(ValueError, match=message):
        check_tiling(tile, overlap, 8)
    model = Pointwise().eval()
    with pytest.raises(ValueError, match=message):
        restore_image(model, torch.rand(3, 40, 40), tile=tile, overlap=overlap)


def test_auto_tiling_after_an_out_of_memory_error_gives_the_untiled_result():
    model = OutOfMemoryAbove(limit=128 * 128).double().eval()
    x = torch.rand(3, 300, 200, dtype=torch.float64)
    with pytest.raises(torch.OutOfMemoryError):
        restore_image(model, x)  # tile=None: no fallback
    result = restore_image(model, x, tile="auto", overlap=32)
    assert result.tile == 128 and result.tiles > 1 and AUTO_TILE > 128
    assert (304, 200) in model.calls  # the whole image was tried first
    reference = Pointwise().double().eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items()})
    torch.testing.assert_close(result.image, _untiled(reference, x), rtol=0, atol=1e-13)
    tiny_gpu = OutOfMemoryAbove(limit=10).eval()
    with pytest.raises(MemoryError, match="out of memory even with"):
        restore_image(tiny_gpu, torch.rand(3, 64, 64), tile="auto", overlap=4)


def test_out_of_memory_detection():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ------------------------------------------------------------------------------------------ AMP, misc

def test_amp_is_guarded_by_device_type():
    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu, "auto"), contextlib.nullcontext)
    assert isinstance(autocast(cpu, "none"), contextlib.nullcontext)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast(cpu, "bf16")
    with pytest.raises(ValueError, match="unknown amp mode"):
        autocast(cpu, "fp8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" where there is none
        ctx = autocast(torch.device("cuda"), "fp16")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        restore_image(Pointwise().eval(), torch.rand(3, 8, 8), amp="fp16")


def test_forced_routing_and_argument_checks():
    model = build_model("tiny").eval()
    x = torch.rand(3, 24, 24)
    own = restore_image(model, x)
    forced = restore_image(model, x, routing=own.routing)
    torch.testing.assert_close(forced.image, own.image)
    with pytest.raises(ValueError, match="cannot be combined with tiles"):
        restore_image(model, x, routing=own.routing, tile=16, overlap=8)
    with pytest.raises(ValueError, match="one image"):
        restore_image(model, torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="tile must be"):
        restore_image(model, x, tile="big")

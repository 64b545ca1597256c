"""Full-image inference: any size, any channel count, tiled when asked or when memory runs out, AMP.

* **Sizes.** The models need heights and widths that are multiples of ``size_multiple`` (8 for
  PromptIR: three halvings). ``pad_to_multiple`` reflect-pads the bottom/right edges (replicate where
  an edge is too short to reflect), the output is cropped back to the input's size.
* **Channels.** ``to_rgb``: greyscale is replicated to three channels, an alpha channel is dropped
  with a warning (grey + alpha keeps the grey).
* **Tiles.** ``tile=T`` runs ``T x T`` windows (``T`` a multiple of the model's multiple) whose
  starts are multiples of the model's multiple and step by at most ``T - overlap``. Where tiles
  overlap, a tile's output is used only from ``overlap // 4`` pixels inside its inner edge and is
  cross-faded linearly with its neighbour over the middle half of the overlap; image borders are
  never faded. So for a model whose receptive field has radius at most ``overlap // 4`` (and is
  shift-equivariant by multiples of its size multiple) the tiled result equals the untiled one to
  float rounding, and for a pointwise model exactly. PromptIR's router (a global mean) and its
  transposed attention are global, so tiled PromptIR output is an approximation: each tile routes
  itself.
* **Memory.** ``tile="auto"`` (the default of the command lines) runs the whole image and, if that
  runs out of memory, retries with ``AUTO_TILE`` tiles, halving them until one fits.
* **AMP.** ``amp="auto"`` uses bfloat16 autocast on CUDA devices that support it (float16 where they
  do not) and nothing on the CPU; outputs are then float32.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cpl_fast.inference.options import AMP_MODES, AUTO_TILE, DEFAULT_OVERLAP  # noqa: F401 (public)
from cpl_fast.models import Routing


class Restoration(NamedTuple):
    """One restored image ``(1, 3, H, W)`` (float32, or the model's dtype when wider), the routing of
    every prompt level (one row per tile) and how it was run (``tile`` None: whole image)."""

    image: torch.Tensor
    routing: list[Routing]
    tile: int | None
    tiles: int


def model_multiple(model: nn.Module) -> int:
    """The size multiple a model needs (``size_multiple``; 8, PromptIR's, when it declares none)."""
    multiple = getattr(model, "size_multiple", 8)
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"{type(model).__name__}.size_multiple must be a positive integer, got {multiple!r}")
    return multiple


def to_rgb(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """``(C, H, W)`` or ``(B, C, H, W)`` with C in 1-4 to three channels (see the module docstring)."""
    if image.dim() not in (3, 4):
        raise ValueError(f"{name}: expected (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
    channels = image.shape[-3]
    if channels == 3:
        return image
    if channels in (2, 4):
        warnings.warn(f"{name}: alpha channel dropped (restored as RGB)", UserWarning, stacklevel=2)
        image = image.narrow(-3, 0, channels - 1)
        channels -= 1
    if channels == 1:
        sizes = [-1] * image.dim()
        sizes[-3] = 3
        return image.expand(*sizes).contiguous()
    if channels == 3:
        return image
    raise ValueError(f"{name}: expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels, "
                     f"got {channels}")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad ``(B, C, H, W)`` at the bottom/right to multiples of ``multiple``; returns
    the padded batch and the original ``(H, W)``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def check_tiling(tile: int, overlap: int, multiple: int) -> None:
    """Raise ValueError naming the problem with a tile size / overlap for a model's multiple."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
        raise ValueError(f"tile overlap must be an integer >= 0, got {overlap!r}")
    if tile % multiple:
        raise ValueError(f"tile {tile} is not a multiple of the model's size multiple {multiple}; "
                         f"use e.g. {max(multiple, tile // multiple * multiple)}")
    if overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile {tile}")
    if tile - overlap < multiple:
        raise ValueError(f"tile {tile} minus overlap {overlap} must be at least the model's size multiple "
                         f"{multiple} (the step between tiles)")


def autocast(device: torch.device, amp: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast context for ``amp`` on ``device`` (``auto``: bf16/fp16 on CUDA, none elsewhere)."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {amp!r}; choose one of {', '.join(AMP_MODES)}")
    if amp == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "none":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"amp={amp} needs a CUDA device; this model runs on {device} (use amp=none)")
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def _profile(start: int, size: int, length: int, overlap: int, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    """Per-pixel blend weight along one axis of a tile ``[start, start + size)`` in ``[0, length)``."""
    margin = overlap // 4
    width = max(1, overlap - 2 * margin)
    d = torch.arange(size, device=device, dtype=torch.float64)
    big = torch.full_like(d, math.inf)
    left = d if start > 0 else big
    right = (size - 1 - d) if start + size < length else big
    dist = torch.minimum(left, right)
    return ((dist + 0.5 - margin) / width).clamp(0.0, 1.0).to(dtype)


def _tiles(h: int, w: int, tile: int, overlap: int, multiple: int) -> Iterator[tuple[int, int, int, int]]:
    th, tw = min(tile, h), min(tile, w)
    step = max(multiple, (tile - overlap) // multiple * multiple)
    for y in _starts(h, th, step):
        for x in _starts(w, tw, step):
            yield y, x, th, tw


def _concat_routing(per_tile: list[list[Routing]]) -> list[Routing]:
    if len(per_tile) == 1:
        return per_tile[0]
    levels = []
    for rows in zip(*per_tile):
        probs = None if any(r.probs is None for r in rows) else torch.cat([r.probs for r in rows])
        indices, weights = torch.cat([r.indices for r in rows]), torch.cat([r.weights for r in rows])
        levels.append(Routing(indices, weights, probs))
    return levels


def _run(model: nn.Module, x: torch.Tensor, amp: str,
         routing: list[Routing] | None) -> tuple[torch.Tensor, list[Routing]]:
    with autocast(x.device, amp):
        if routing is None:
            out, used = model(x, return_routing=True)
        else:
            out, used = model(x, routing=routing, return_routing=True)
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return out, list(used)


def _forward_tiled(model: nn.Module, x: torch.Tensor, tile: int, overlap: int, multiple: int, amp: str,
                   progress: bool, log: Callable[[str], None] | None = None,
                   why: str = "") -> tuple[torch.Tensor, list[Routing], int]:
    from tqdm.auto import tqdm

    h, w = x.shape[-2:]
    boxes = list(_tiles(h, w, tile, overlap, multiple))
    if log is not None and len(boxes) > 1:
        log(f"{w}x{h} restored in {len(boxes)} tiles of {tile}x{tile} (overlap {overlap}){why}")
    out: torch.Tensor | None = None
    total: torch.Tensor | None = None
    routings = []
    for y, x0, th, tw in tqdm(boxes, desc="tiles", leave=False, disable=not progress or len(boxes) < 2):
        piece, used = _run(model, x[..., y:y + th, x0:x0 + tw], amp, None)
        if out is None or total is None:
            out = piece.new_zeros(x.shape[0], piece.shape[1], h, w)
            total = piece.new_zeros(1, 1, h, w)
        weight = (_profile(y, th, h, overlap, x.device, piece.dtype)[:, None]
                  * _profile(x0, tw, w, overlap, x.device, piece.dtype)[None, :])
        out[..., y:y + th, x0:x0 + tw] += piece * weight
        total[..., y:y + th, x0:x0 + tw] += weight
        routings.append(used)
    assert out is not None and total is not None
    return out / total, _concat_routing(routings), len(boxes)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA and CPU allocation failures."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@torch.no_grad()
def restore_image(model: nn.Module, image: torch.Tensor, tile: int | str | None = None,
                  overlap: int = DEFAULT_OVERLAP, amp: str = "auto", multiple: int | None = None,
                  routing: list[Routing] | None = None, progress: bool = False,
                  log: Callable[[str], None] | None = None) -> Restoration:
    """Restore one image ``(C, H, W)`` or ``(1, C, H, W)`` of any size with ``model`` (in its mode).

    ``tile``: None (whole image), an int (tiles of that size) or ``"auto"`` (whole image, tiles on an
    out-of-memory error). ``routing`` forces the prompt of every level (untiled only). The input is
    moved to the model's device and dtype; the result is on that device, in the model's dtype
    (float32 under AMP). ``progress``: a bar over the tiles; ``log``: told when the image is tiled
    (size, number of tiles, and why when it was memory).
    """
    multiple = model_multiple(model) if multiple is None else multiple
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"restore_image takes one image (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else image.device
    dtype = param.dtype if param is not None else torch.float32
    x = to_rgb(image).to(device, dtype)
    padded, (h, w) = pad_to_multiple(x, multiple)
    if isinstance(tile, int):
        check_tiling(tile, overlap, multiple)
    elif tile not in (None, "auto"):
        raise ValueError(f"tile must be None, 'auto' or a positive integer, got {tile!r}")
    if routing is not None and tile is not None and tile != "auto":
        raise ValueError("a forced routing applies to the whole image; it cannot be combined with tiles")
    why = ""
    if not isinstance(tile, int):
        try:
            out, used = _run(model, padded, amp, routing)
            return Restoration(out[..., :h, :w], used, None, 1)
        except Exception as exc:  # noqa: BLE001 - only memory errors are retried, the rest re-raised
            if tile != "auto" or routing is not None or not is_out_of_memory(exc):
                raise
        why = ": the whole image did not fit in memory"
        tile = AUTO_TILE
        while tile >= max(padded.shape[-2:]) and tile // 2 >= multiple:
            tile = tile // 2 // multiple * multiple  # a tile as big as the image would fail the same way
    while True:
        try:
            check_tiling(tile, overlap, multiple)
        except ValueError as exc:
            raise MemoryError(f"out of memory even with {tile}x{tile} tiles ({exc}); use a smaller "
                              f"--tile-overlap, the CPU, or a machine with more memory") from exc
        try:
            out, used, count = _forward_tiled(model, padded, tile, overlap, multiple, amp, progress, log, why)
            return Restoration(out[..., :h, :w], used, tile, count)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            smaller = max(multiple, tile // 2 // multiple * multiple)
            if smaller == tile:
                raise MemoryError(f"out of memory even with {tile}x{tile} tiles") from exc
            why = f": {tile}x{tile} tiles did not fit in memory"
            tile = smaller


def restore_full(model: nn.Module, image: torch.Tensor, multiple: int | None = None,
                 **options: Any) -> tuple[torch.Tensor, list[Routing]]:
    """``(restored (1, 3, H, W), routing)`` of one image; ``options`` as for :func:`restore_image`."""
    result = restore_image(model, image, multiple=multiple, **options)
    return result.image, result.routing

"""Restoration scores and routing statistics for training reports.

PSNR and SSIM are computed on RGB images in ``[0, 1]`` (clipped), ``data_range=1``, with
scikit-image (SSIM: 7x7 uniform window, per channel, averaged), as PromptIR's evaluation does on
RGB. Entropies are in bits.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(image.shape)}")
    return image.detach().to(torch.float64).clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()


def psnr(restored: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of two RGB images ``(3, H, W)`` (or ``(1, 3, H, W)``) in ``[0, 1]``."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _to_hwc(restored), _to_hwc(target)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=1.0))


def ssim(restored: torch.Tensor, target: torch.Tensor) -> float:
    """SSIM of two RGB images ``(3, H, W)`` in ``[0, 1]`` (mean over channels)."""
    from skimage.metrics import structural_similarity

    a, b = _to_hwc(restored), _to_hwc(target)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return float(structural_similarity(b, a, data_range=1.0, channel_axis=2))


def entropy_bits(distribution: torch.Tensor | np.ndarray) -> float:
    """Shannon entropy in bits of a non-negative vector, normalised to sum to one first."""
    p = torch.as_tensor(distribution, dtype=torch.float64).flatten()
    if p.numel() == 0 or bool((p < 0).any()) or not bool(torch.isfinite(p).all()):
        raise ValueError("entropy needs a non-empty, finite, non-negative vector")
    total = p.sum()
    if total <= 0:
        raise ValueError("entropy needs a vector with a positive sum")
    p = p / total
    nz = p[p > 0]
    return max(0.0, float(-(nz * torch.log2(nz)).sum()))  # no -0.0 for a one-hot vector


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad ``(B, C, H, W)`` at the bottom/right to multiples of ``multiple``; returns
    the padded batch and the original ``(H, W)``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


@torch.no_grad()
def restore_full(model: nn.Module, image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, list]:
    """Restore one full image ``(1, 3, H, W)``: pad to the model's multiple, run, crop back.

    Returns the restoration and the per-level routing.
    """
    padded, (h, w) = pad_to_multiple(image, multiple)
    out, routing = model(padded, return_routing=True)
    return out[..., :h, :w], list(routing)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, device: torch.device, dtype: torch.dtype = torch.float32,
             multiple: int = 8, max_images: int | None = None) -> dict[str, Any]:
    """Per-task PSNR / SSIM on full images and the routing statistics of each prompt level.

    ``dataset`` items are dicts with ``input``, ``target`` ``(3, H, W)`` and ``task`` (``EvalDataset``).
    Per task and level: ``counts`` (how often each expert was selected, over images and the top-k
    slots), ``mean_probs`` (the router's softmax averaged over images), ``selection_entropy`` (bits;
    of the normalised counts for sparse routing, of ``mean_probs`` for dense routing: the entropy of
    the average selection distribution) and ``mean_softmax_entropy`` (bits; the per-image softmax
    entropy, averaged). The model is put in eval mode and restored to its previous mode.
    """
    was_training = model.training
    model.eval()
    per_task: dict[str, dict[str, Any]] = {}
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    try:
        for index in range(count):
            item = dataset[index]
            x = item["input"].unsqueeze(0).to(device, dtype)
            restored, routing = restore_full(model, x, multiple)
            restored = restored.float().cpu()
            task = per_task.setdefault(item["task"], {"psnr": [], "ssim": [], "levels": []})
            task["psnr"].append(psnr(restored, item["target"]))
            task["ssim"].append(ssim(restored, item["target"]))
            if not task["levels"]:
                task["levels"] = [{"indices": [], "probs": [], "dense": False} for _ in routing]
            for level, r in zip(task["levels"], routing, strict=True):
                level["indices"].append(r.indices.cpu())
                level["probs"].append(r.probs.double().cpu())
                level["dense"] = r.indices.shape[1] == r.probs.shape[1]
    finally:
        model.train(was_training)
    return {name: _summarise(task) for name, task in sorted(per_task.items())}


def _summarise(task: Mapping[str, Any]) -> dict[str, Any]:
    levels = []
    for level in task["levels"]:
        probs = torch.cat(level["probs"])
        indices = torch.cat(level["indices"])
        n = probs.shape[1]
        counts = torch.bincount(indices.flatten(), minlength=n).double()
        mean_probs = probs.mean(dim=0)
        selection = entropy_bits(mean_probs if level["dense"] else counts)
        per_image = float(sum(entropy_bits(p) for p in probs) / probs.shape[0])
        levels.append({"dense": level["dense"], "counts": counts.tolist(), "mean_probs": mean_probs.tolist(),
                       "selection_entropy": selection, "mean_softmax_entropy": per_image})
    return {"images": len(task["psnr"]), "psnr": float(np.mean(task["psnr"])),
            "ssim": float(np.mean(task["ssim"])), "levels": levels}

"""Speed of cpr_distances, forward + backward, on the VGG19 layers CPR reads.

Shapes: B = 2 samples with m = 4 negatives, so (1 + m) B = 10 feature rows from one pass of a 64x64 input,
f_pos and f_neg being views of those rows as in training. Providers: ``reference`` (plain PyTorch),
``compile`` (torch.compile of the reference), and every fused backend available on the device.
Run with ``pytest bench/test_cpr_distances.py``; nothing here asserts a speed.
"""
from __future__ import annotations

import pytest
import torch

from cpl_fast.ops import cpr_distances, cpr_distances_reference
from cpl_fast.ops.cpr_distances import DISPATCHER

BATCH, NEGATIVES = 2, 4
LAYERS = {  # VGG19 feature shapes (C, H, W) at a 64x64 input
    "relu1_1": (64, 64, 64),
    "relu2_1": (128, 32, 32),
    "relu3_1": (256, 16, 16),
    "relu4_1": (512, 8, 8),
    "relu5_1": (512, 4, 4),
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = [name for name in ("cpu", "cuda", "triton") if not DISPATCHER.backends[name].available(DEVICE)]
PROVIDERS = ["reference", "compile"] + FUSED


def _setup(shape: tuple[int, ...]):
    """Feature rows of one pass (leaf with grad), ground-truth features, weights and upstream gradients."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn((1 + NEGATIVES) * BATCH, *shape, generator=gen).to(DEVICE).requires_grad_(True)
    f_gt = torch.randn(BATCH, *shape, generator=gen).to(DEVICE)
    weights = (torch.rand(BATCH, NEGATIVES, generator=gen) + 0.5).to(DEVICE)
    upstream = (torch.randn(BATCH, generator=gen).to(DEVICE), torch.randn(BATCH, generator=gen).to(DEVICE))
    return feats, f_gt, weights, upstream


def _provider(name: str):
    if name == "reference":
        return cpr_distances_reference
    if name == "compile":
        return torch.compile(cpr_distances_reference, dynamic=False)
    return lambda *args: cpr_distances(*args, backend=name)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_cpr_distances_full(benchmark, layer, provider):
    feats, f_gt, weights, upstream = _setup(LAYERS[layer])
    fn = _provider(provider)

    def step():
        feats.grad = None
        f_pos, f_neg = feats[:BATCH], feats[BATCH:].view(NEGATIVES, BATCH, *LAYERS[layer])
        torch.autograd.backward(fn(f_pos, f_gt, f_neg, weights), upstream)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # compilation, autotuning and allocator warm-up stay out of the timings
        step()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = "cpr_distances-full"
    benchmark.extra_info.update(layer=layer, provider=provider, device=str(DEVICE),
                                shape=[(1 + NEGATIVES) * BATCH, *LAYERS[layer]])
    benchmark(step)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()

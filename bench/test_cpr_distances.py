"""Speed of cpr_distances, forward + backward, on the VGG19 layers CPR reads.

Shapes: B = 2 samples with m = 4 negatives, so (1 + m) B = 10 feature rows from one pass of a 64x64 input,
f_pos and f_neg being views of those rows as in training. Providers: ``reference`` (plain PyTorch),
``compile`` (torch.compile of the reference), and the fused backends ``cpu``, ``cuda`` and ``triton``
(each skipped, with the dispatcher's reasons, where it cannot run; ``cuda`` and ``triton`` carry the
``gpu`` marker).

Bytes moved (the least one forward + backward must read and write): the forward reads f_pos, f_gt
and the m negatives, ``(2 + m) B N`` elements (N per sample); the backward reads them again and
writes the gradients of f_pos and the negatives (f_gt needs none), ``(1 + m) B N`` more. Each case's
median time is set against the device's measured copy bandwidth (bench/conftest.py) in a table
under the results. Run with ``pytest bench/test_cpr_distances.py``; nothing here asserts a speed.
"""
from __future__ import annotations

import pytest
import torch
from gpu_marks import fused_provider  # bench/gpu_marks.py (pytest puts bench/ on sys.path)

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

PROVIDERS = ["reference", "compile"] + [
    fused_provider(DISPATCHER, name, DEVICE) for name in ("cpu", "cuda", "triton")]
_measured: dict[tuple[str, str], dict[str, float]] = {}   # (case, provider) -> numbers


def bytes_moved(shape: tuple[int, ...], element_size: int) -> int:
    """The least bytes one forward + backward must read and write (see the module docstring)."""
    per_sample = 1
    for size in shape:
        per_sample *= size
    return ((2 + NEGATIVES) + (2 + NEGATIVES) + (1 + NEGATIVES)) * BATCH * per_sample * element_size


def _setup(shape: tuple[int, ...]):
    """Feature rows of one pass (leaf with grad), ground-truth features, weights and upstream gradients."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn((1 + NEGATIVES) * BATCH, *shape, generator=gen).to(DEVICE).requires_grad_(True)
    f_gt = torch.randn(BATCH, *shape, generator=gen).to(DEVICE)
    weights = (torch.rand(BATCH, NEGATIVES, generator=gen) + 0.5).to(DEVICE)
    upstream = (torch.randn(BATCH, generator=gen).to(DEVICE), torch.randn(BATCH, generator=gen).to(DEVICE))
    return feats, f_gt, weights, upstream


def _case(layer: str) -> str:
    """A row of the results table: the layer and the shape of its feature rows."""
    return f"{layer} ({(1 + NEGATIVES) * BATCH},{','.join(map(str, LAYERS[layer]))})"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_cpr_distances_full(benchmark, sync, copy_bandwidth, op_provider, layer, provider):
    feats, f_gt, weights, upstream = _setup(LAYERS[layer])
    fn = op_provider(provider, cpr_distances_reference,
                     lambda name: (lambda *args: cpr_distances(*args, backend=name)))

    def step():
        feats.grad = None
        f_pos, f_neg = feats[:BATCH], feats[BATCH:].view(NEGATIVES, BATCH, *LAYERS[layer])
        torch.autograd.backward(fn(f_pos, f_gt, f_neg, weights), upstream)
        sync()

    for _ in range(3):  # compilation, autotuning and allocator warm-up stay out of the timings
        step()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = "cpr_distances-full"
    # case= and provider= make the results table's rows and columns (bench/conftest.py).
    benchmark.extra_info.update(case=_case(layer), layer=layer, provider=provider, device=str(DEVICE),
                                shape=[(1 + NEGATIVES) * BATCH, *LAYERS[layer]])
    benchmark(step)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    median = benchmark.stats.stats.median
    moved = bytes_moved(LAYERS[layer], feats.element_size())
    benchmark.extra_info.update(bytes_moved=moved, copy_bandwidth_bytes_per_s=copy_bandwidth,
                                of_copy_bandwidth=round(moved / median / copy_bandwidth, 4))
    _measured[(_case(layer), provider)] = {"median": median, "bytes_moved": moved,
                                           "copy_bandwidth": copy_bandwidth}


@pytest.fixture(scope="module", autouse=True)
def write_bandwidth_table(bench_notes, bandwidth_lines):
    """After the last case, the share of the copy bandwidth of every case, under the results."""
    yield
    rows = [(case, provider, r["median"], r["bytes_moved"]) for (case, provider), r in _measured.items()]
    if rows:
        bandwidth = next(iter(_measured.values()))["copy_bandwidth"]
        bench_notes["cpr_distances"].extend(bandwidth_lines(rows, bandwidth))

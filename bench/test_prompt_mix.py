"""Speed and peak memory of the sparse prompt mix at the prompt stage of the ``cpl`` model.

PromptIR-style decoders inject three prompts: prompt1 (bank (5, 64, 64, 64)) at the decoder's
level-2 resolution (crop / 2), prompt2 ((5, 128, 32, 32)) at crop / 4 and prompt3
((5, 320, 16, 16)) at crop / 8. Batch 8, top-1 routing (CPL's default). Settings:

* ``train``: 128 x 128 crops, forward + backward (group ``prompt_mix-full``);
* ``infer``: 512 x 512 images, forward under ``no_grad`` (group ``prompt_mix-fwd``).

Providers: ``materialized`` (the published implementations' dense prompt: the bank repeated per
sample and weighted by dense probabilities, zero outside the top-k), ``reference`` (gather the k
selected experts, mix, resize), ``compile`` (torch.compile of ``reference``), and the fused
backends ``cpu``, ``triton`` and ``cuda`` (each skipped, with the dispatcher's reasons, where it
cannot run; ``triton`` and ``cuda`` carry the ``gpu`` marker). Peak memory is the extra memory one
call allocates (see bench/conftest.py for how it is measured).

Bytes moved: what any implementation must read and write, at least (float32): the forward reads the
selected experts (each distinct expert once) and writes the output; the backward reads ``grad_out``
and the selected experts again (for ``grad_weights``) and writes the whole, dense ``grad_bank``. The
weights and indices (``B x k`` values) are left out. Each case's median time is set against the
device's measured copy bandwidth (bench/conftest.py) in a table under the results.

Run with ``pytest bench/test_prompt_mix.py`` (or ``pytest bench/``); nothing here asserts a speed.
The last test checks the targets (the fused CPU kernel at least 5x faster than ``materialized`` and
faster than ``compile`` for forward + backward; its peak extra memory in the forward no more than
one output tensor) and writes them under the results table.
"""
from __future__ import annotations

import os

import pytest
import torch
from gpu_marks import fused_provider  # bench/gpu_marks.py (pytest puts bench/ on sys.path)

from cpl_fast.ops import prompt_mix, prompt_mix_materialized, prompt_mix_reference
from cpl_fast.ops.prompt_mix import DISPATCHER

BATCH, EXPERTS, TOP_K = 8, 5, 1
LEVELS = {  # name: (channels, bank size S, downscale of the crop where the prompt is applied)
    "prompt1": (64, 64, 2),
    "prompt2": (128, 32, 4),
    "prompt3": (320, 16, 8),
}
SETTINGS = {"train": (128, "full"), "infer": (512, "fwd")}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = [name for name in ("cpu", "triton", "cuda") if not DISPATCHER.backends[name].available(DEVICE)]

PROVIDERS = ["materialized", "reference", "compile"] + [
    fused_provider(DISPATCHER, name, DEVICE) for name in ("cpu", "triton", "cuda")]

_measured: dict[tuple[str, str, str], dict[str, float]] = {}   # (setting, level, provider) -> numbers


def _case(setting: str, level: str) -> str:
    channels, size, down = LEVELS[level]
    crop = SETTINGS[setting][0]
    return f"{setting} {crop}px {level} ({EXPERTS},{channels},{size},{size})->{crop // down}"


def _setup(level: str, setting: str):
    channels, size, down = LEVELS[level]
    out_size = SETTINGS[setting][0] // down
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(EXPERTS, channels, size, size, generator=gen).to(DEVICE)
    logits = torch.randn(BATCH, EXPERTS, generator=gen).to(DEVICE)
    probs = logits.softmax(1)
    weights, indices = probs.topk(TOP_K, dim=1)
    dense = torch.zeros_like(probs).scatter(1, indices, weights)    # one-hot-ish: zero outside the top-k
    grad_out = torch.randn(BATCH, channels, out_size, out_size, generator=gen).to(DEVICE)
    return bank, indices, weights.contiguous(), dense, (out_size, out_size), grad_out


def bytes_moved(bank: torch.Tensor, indices: torch.Tensor, out_numel: int, mode: str) -> int:
    """The least bytes one call must read and write (see the module docstring)."""
    element = bank.element_size()
    expert = bank[0].numel() * element
    selected = int(indices.unique().numel()) * expert
    out = out_numel * element
    forward = selected + out
    return forward if mode == "fwd" else forward + out + selected + bank.shape[0] * expert


def _provider(op_provider, name: str):
    """``fn(bank, indices, weights, dense_probs, size)``."""
    if name == "materialized":
        return lambda bank, indices, weights, dense, size: prompt_mix_materialized(bank, dense, size)
    fn = op_provider(name, prompt_mix_reference,
                     lambda backend: (lambda *args: prompt_mix(*args, backend=backend)))
    return lambda bank, indices, weights, dense, size: fn(bank, indices, weights, size)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_prompt_mix(benchmark, sync, peak_memory, copy_bandwidth, op_provider, setting, level, provider):
    bank, indices, weights, dense, size, grad_out = _setup(level, setting)
    fn = _provider(op_provider, provider)
    mode = SETTINGS[setting][1]
    if mode == "full":
        bank.requires_grad_(True)
        leaf = dense if provider == "materialized" else weights
        leaf.requires_grad_(True)

        def step():
            bank.grad = leaf.grad = None
            out = fn(bank, indices, weights, dense, size)
            out.backward(grad_out)
            sync()
            return bank.grad
    else:
        def step():
            with torch.no_grad():
                out = fn(bank, indices, weights, dense, size)
            sync()
            return out

    for _ in range(3):  # compilation and allocator warm-up stay out of the timings
        step()
    peak = peak_memory(step)
    output_bytes = grad_out.numel() * grad_out.element_size()
    benchmark.group = f"prompt_mix-{mode}"
    benchmark.extra_info.update(case=_case(setting, level), provider=provider, device=str(DEVICE),
                                peak_extra_bytes=peak, output_bytes=output_bytes,
                                peak_over_output=round(peak / output_bytes, 3))
    benchmark(step)
    median = benchmark.stats.stats.median
    moved = bytes_moved(bank, indices, grad_out.numel(), mode)
    benchmark.extra_info.update(bytes_moved=moved, copy_bandwidth_bytes_per_s=copy_bandwidth,
                                of_copy_bandwidth=round(moved / median / copy_bandwidth, 4))
    _measured[(setting, level, provider)] = {"median": median, "peak": peak, "output_bytes": output_bytes,
                                             "bytes_moved": moved, "copy_bandwidth": copy_bandwidth}


def _targets() -> list[str]:
    """Markdown lines: the fused kernel's targets, met or not, per level."""
    fused = "cpu" if DEVICE.type == "cpu" else ("cuda" if "cuda" in FUSED else "triton")
    lines = [f"### Targets ({fused} backend)", ""]
    for level in LEVELS:
        train = {p: _measured.get(("train", level, p)) for p in ("materialized", "compile", fused)}
        infer = _measured.get(("infer", level, fused))
        if None in train.values() or infer is None:
            continue
        over_materialized = train["materialized"]["median"] / train[fused]["median"]
        over_compile = train["compile"]["median"] / train[fused]["median"]
        excess = infer["peak"] - infer["output_bytes"]
        # A few rows of per-thread scratch are allowed: the target is "no second tensor of output size".
        memory_met = excess <= 0.01 * infer["output_bytes"]
        lines.append(
            f"- {level}: forward+backward speed-up {over_materialized:.2f}x over materialized "
            f"({'met' if over_materialized >= 5 else 'MISSED'}: >= 5x), {over_compile:.2f}x over compile "
            f"({'met' if over_compile > 1 else 'MISSED'}: > 1x); inference peak extra memory = one output "
            f"{'+' if excess >= 0 else '-'} {abs(excess)} bytes ({'met' if memory_met else 'MISSED'}: <= one output "
            f"+ 1% scratch)")
    return lines


@pytest.fixture(scope="module", autouse=True)
def write_bandwidth_table(bench_notes, bandwidth_lines):
    """After the last case, the share of the copy bandwidth of every case, under the results."""
    yield
    rows = [(_case(setting, level), provider, r["median"], r["bytes_moved"])
            for (setting, level, provider), r in _measured.items()]
    if rows:
        bandwidth = next(iter(_measured.values()))["copy_bandwidth"]
        bench_notes["prompt_mix"].extend(["", *bandwidth_lines(rows, bandwidth)])


def test_prompt_mix_targets(bench_notes):
    """Not an assertion of speed: records which targets the fused backend met in this run."""
    lines = _targets()
    if len(lines) <= 2:
        pytest.skip("needs the train and infer cases of materialized, compile and the fused backend in one run")
    notes = lines + [
        "",
        "Peak extra memory: CPU allocations recorded by torch.profiler(profile_memory=True) during one call "
        "(CUDA: max_memory_allocated); train cases include the gradients of bank and weights.",
    ]
    load = os.getloadavg()[0]
    if DEVICE.type == "cpu" and torch.get_num_threads() > 1 and load > (os.cpu_count() or 1):
        notes.append(f"The processor was shared (load average {load:.1f} on {os.cpu_count()} cores): a multi-threaded "
                     "call waits for its descheduled worker threads, which can dominate the short train cases; "
                     "compare with a run under OMP_NUM_THREADS=1.")
    bench_notes["prompt_mix"].extend(notes)
    print("\n" + "\n".join(lines))

"""A full CPL training step (forward, backward, Adam) with m = 4 negatives, k = 1, six ways.

Cases: the ``cpl`` model (the paper's size) on 64x64 crops, batch 1 and 2; the ``tiny`` model on
128x128 crops, batch 4; and, marked ``gpu`` and skipped without a CUDA device, the ``cpl`` model at
the paper's 128x128, batch 4, with float32 weights run in float32 (``cpl-128-b4``) and under bfloat16
autocast (``cpl-128-b4-bf16``), every provider but ``literal``, the compiled ones included.
Providers: ``literal`` (Algorithm 1, per
sample), ``loop`` (batched, one pass per negative), ``fast_reference`` / ``fast_fused`` (one
encode, one decoder pass over ``B (1 + m)`` rows; ``cpr_distances`` forced to the reference
backend / left to dispatch, the fused kernel), ``fast_fused_chunk1`` (the same step with
``neg_chunk=1``: the positives and the first negative in one decoder pass, then one pass per
negative), ``compile_loop`` / ``compile_fast`` (``torch.compile`` of ``loop`` / ``fast_fused``).
Features: VGG19 with random weights (same cost as the real one), taps relu1_1 ... relu5_1.

Reported per case and provider: median time per step (wall clock, and the process's CPU time:
on one thread, ``OMP_NUM_THREADS=1``, the CPU time is the step's own compute and stays honest when
other work shares the processor), images/s, peak memory and the FLOPs the step does (on a GPU also
the achieved FLOP/s against the measured float32 and bfloat16 matmul rates). Peak memory
is measured twice: the extra bytes of PyTorch's allocator during one step
(``peak_memory`` of conftest.py, every provider), and, for the eager providers on the CPU, the rise
of the process's resident-set high-water mark (``ru_maxrss``) over its resident size just before
one step run in a fresh subprocess (what the operating system sees, the allocator's caching
included; that step also allocates the gradients and Adam's state, the same for every provider).
FLOPs: bench/flops.py's counter over one eager step (compiled providers do the same maths): torch's
``FlopCounterMode`` with the backward of grouped convolutions counted right (torch's own formula
counts a depthwise convolution's backward about C/2 times too high).

CPU steps take seconds to tens of seconds on a 2-core CPU (the restoration network dominates; VGG19 at
64x64 is about 5% of a step), so to stay
within about 20 minutes: pedantic mode, ``CPR_STEP_ROUNDS`` timed rounds (default 1) after one
warm-up; the eager warm-up step is the one measured for memory and FLOPs (a compiled provider
whose eager counterpart did not run in the same session counts one eager step of it); ``literal``
and the compiled providers run on ``cpl-64-b1`` only among the CPU cases, the fresh-process RSS only
with ``CPR_STEP_RSS=1``.
``torch.compile`` providers run last; one whose first (compiling) step takes
longer than ``CPR_STEP_COMPILE_LIMIT_S`` (default 300 s), or that would start after
``CPR_STEP_BUDGET_S`` (default 900 s) of this module, is skipped with the measured reason.
CPU tensors come from ``cpl_fast.memory``'s caching allocator (what ``cpl-train`` uses on the CPU),
emptied before each provider; ``CPR_STEP_CPU_ALLOCATOR=system`` measures glibc's instead, whose
fresh mmap of every allocation above 32 MiB page-faults the one-pass step's large activations on
every step (``bench/step_rusage.py``). Run with ``pytest bench/test_cpr_step.py``; nothing here
asserts a speed.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flops import RULE, count_flops  # bench/flops.py (bench/ is on sys.path under pytest and as a script)

from cpl_fast import memory
from cpl_fast.losses import CPRLoss, PerceptualFeatures
from cpl_fast.models import build_model
from cpl_fast.train import MismatchedExperts, fast_cpl_step, literal_cpl_step, loop_cpl_step

M = 4
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# name: (preset, crop size, batch, autocast dtype or None)
CPU_CASES = {"cpl-64-b1": ("cpl", 64, 1, None), "cpl-64-b2": ("cpl", 64, 2, None),
             "tiny-128-b4": ("tiny", 128, 4, None)}
# The paper's crop size: does not fit this benchmark's CPU budget, so GPU only.
GPU_CASES = {"cpl-128-b4": ("cpl", 128, 4, None), "cpl-128-b4-bf16": ("cpl", 128, 4, torch.bfloat16)}
CASES = {**CPU_CASES, **GPU_CASES}
EAGER = ["literal", "loop", "fast_reference", "fast_fused", "fast_fused_chunk1"]
COMPILED = ["compile_loop", "compile_fast"]
# A compiled provider does the maths of its eager counterpart: its FLOPs are counted there.
FLOPS_OF = {"compile_loop": "loop", "compile_fast": "fast_fused"}
ROUNDS = int(os.environ.get("CPR_STEP_ROUNDS", "1"))
COMPILE_LIMIT_S = float(os.environ.get("CPR_STEP_COMPILE_LIMIT_S", "300"))
BUDGET_S = float(os.environ.get("CPR_STEP_BUDGET_S", "900"))
# The slowest provider and the costly measurements run on the smallest case only (time budget).
SMALL = "cpl-64-b1"
RSS = os.environ.get("CPR_STEP_RSS", "0") == "1"
# caching: cpl_fast.memory's caching CPU allocator (what cpl-train uses on the CPU); system: glibc's.
CPU_ALLOCATOR = os.environ.get("CPR_STEP_CPU_ALLOCATOR", "caching")
if CPU_ALLOCATOR not in ("caching", "system"):
    raise ValueError(f"CPR_STEP_CPU_ALLOCATOR must be caching or system, got {CPU_ALLOCATOR!r}")
START = time.perf_counter()
RESULTS: dict[tuple[str, str], dict] = {}
EXTRA: dict[tuple[str, str], dict] = {}   # each case's benchmark.extra_info, for numbers added at the end


def make_setup(case: str, device: torch.device = DEVICE):
    """Model (train mode), features, loss, sampler, Adam and a seeded batch for one case."""
    preset, size, batch, _ = CASES[case]
    torch.manual_seed(0)
    model = build_model(preset).train().to(device)
    features = PerceptualFeatures.random_vgg19(seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(batch, 3, size, size, generator=gen)
    degraded = (target + 0.1 * torch.randn(batch, 3, size, size, generator=gen)).clamp(0, 1)
    target, degraded = target.to(device), degraded.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, features, CPRLoss(), MismatchedExperts(model.num_prompts), optimizer, (degraded, target)


def step_fn(provider: str):
    """The step function of a provider (without ``torch.compile``) and the cpr_distances backend it forces."""
    return {"literal": (literal_cpl_step, None), "loop": (loop_cpl_step, None),
            "fast_reference": (fast_cpl_step, "reference"), "fast_fused": (fast_cpl_step, None),
            "fast_fused_chunk1": (functools.partial(fast_cpl_step, neg_chunk=1), None),
            "compile_loop": (loop_cpl_step, None), "compile_fast": (fast_cpl_step, None)}[provider]


def make_train_step(case: str, provider: str, device: torch.device = DEVICE):
    """``train_step()``: zero grads, CPL step, backward, Adam step (GPU: waited for); the batch size."""
    model, features, loss, sampler, optimizer, batch = make_setup(case, device)
    autocast = CASES[case][3]
    fn, backend = step_fn(provider)
    if provider.startswith("compile"):
        fn = torch.compile(fn, dynamic=False)
    generator = torch.Generator(device=device).manual_seed(0)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # Autocast covers the forward and the loss; the backward runs outside it, as usual.
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = fn(model, batch, features, loss, sampler, m=M, generator=generator)
        out.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def with_backend() -> None:
        previous = os.environ.get("CPL_FAST_BACKEND")
        if backend is not None:
            os.environ["CPL_FAST_BACKEND"] = backend
        try:
            train_step()
        finally:
            if backend is not None:
                if previous is None:
                    del os.environ["CPL_FAST_BACKEND"]
                else:
                    os.environ["CPL_FAST_BACKEND"] = previous
    return with_backend, batch[0].shape[0]


def rss_in_subprocess(case: str, provider: str) -> dict:
    """Peak resident-set rise of one step in a fresh process (see the module docstring)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--rss", case, provider], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def use_cpu_allocator() -> None:
    """Install the allocator ``CPR_STEP_CPU_ALLOCATOR`` names, its cache empty (CPU runs)."""
    if ON_GPU:
        return
    if CPU_ALLOCATOR == "caching":
        memory.enable_cpu_caching()
        memory.empty_cpu_cache()  # no blocks shaped by the previous provider
    elif memory.cpu_caching_enabled():
        memory.disable_cpu_caching()


def _rss_main(case: str, provider: str) -> None:
    use_cpu_allocator()
    train_step, _ = make_train_step(case, provider)
    before, high_before = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_step()
    high_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # When the step never exceeds the earlier high-water mark, its peak is only bounded above.
    print(json.dumps({"rss_peak_rise_bytes": high_after - before, "exact": high_after > high_before}))


@pytest.fixture(scope="module", autouse=True)
def write_summary(bench_notes):
    """After the last case, add the summary below the results table."""
    yield
    if memory.cpu_caching_enabled():
        memory.disable_cpu_caching()
    if RESULTS:
        bench_notes["cpr_step"].extend(summary())


ORDER = [("literal", SMALL)] + [(provider, case) for provider in EAGER[1:] for case in CPU_CASES] + \
        [(provider, SMALL) for provider in COMPILED]
# The GPU cases: compiling is quick enough there to compare the compiled providers on them too
# (compile_fast first: the compiled step a training run would use).
GPU_ORDER = [(provider, case) for case in GPU_CASES for provider in EAGER[1:] + COMPILED[::-1]]
NEEDS_GPU = [pytest.mark.gpu, pytest.mark.skipif(
    not ON_GPU, reason="needs a CUDA device (the paper's 128x128 crops do not fit the CPU budget)")]
PARAMS = [pytest.param(provider, case, id=f"{provider}-{case}") for provider, case in ORDER] + [
    pytest.param(provider, case, id=f"{provider}-{case}", marks=NEEDS_GPU) for provider, case in GPU_ORDER]


@functools.cache
def matmul_rate(dtype: torch.dtype) -> float:
    """The GPU's measured dense matmul rate in FLOP/s (8192^3, the step's TF32 settings)."""
    a = torch.randn(8192, 8192, device=DEVICE, dtype=dtype)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3)


@pytest.mark.parametrize("provider,case", PARAMS)
def test_cpr_step_full(benchmark, peak_memory, bench_notes, provider, case):
    benchmark.group = "cpr_step-full"
    benchmark.extra_info.update(case=case, provider=provider)
    compiled = provider.startswith("compile")
    elapsed = time.perf_counter() - START
    if compiled and elapsed > BUDGET_S:
        reason = f"skipped: the module had run {elapsed:.0f} s, over its {BUDGET_S:.0f} s budget"
        RESULTS[(case, provider)] = {"skipped": reason}
        pytest.skip(reason)
    use_cpu_allocator()
    train_step, batch = make_train_step(case, provider)

    started = time.perf_counter()
    measured: dict = {}
    try:
        if compiled:
            train_step()                                      # warm-up: compilation
        else:                                                 # warm-up: memory and FLOPs of one step
            measured["peak_extra_bytes"] = peak_memory(lambda: measured.update(flops=count_flops(train_step)))
    except Exception as error:                                # a compiler failure is a result to report
        if not compiled:
            raise
        reason = f"skipped: compilation failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        RESULTS[(case, provider)] = {"skipped": reason}
        pytest.skip(reason)
    first = time.perf_counter() - started
    benchmark.extra_info["first_step_s"] = first
    if compiled and first > COMPILE_LIMIT_S:
        reason = f"skipped: compiling took {first:.0f} s (> {COMPILE_LIMIT_S:.0f} s)"
        RESULTS[(case, provider)] = {"skipped": reason}
        pytest.skip(reason)
    cpu_times: list[float] = []

    def timed_step() -> None:
        started_cpu = time.process_time()
        train_step()
        cpu_times.append(time.process_time() - started_cpu)

    benchmark.pedantic(timed_step, rounds=ROUNDS, iterations=1, warmup_rounds=0)

    record = {"median_s": benchmark.stats.stats.median, "cpu_s": statistics.median(cpu_times), "batch": batch,
              "first_step_s": first, **measured}
    if compiled:
        record["peak_extra_bytes"] = peak_memory(train_step)
        record["flops"] = eager_flops(case, FLOPS_OF[provider])
    elif RSS and not ON_GPU:
        record.update(rss_in_subprocess(case, provider))
    benchmark.extra_info.update(record)
    RESULTS[(case, provider)] = record
    EXTRA[(case, provider)] = benchmark.extra_info


def _gpu_rate_lines() -> list[str]:
    """Achieved FLOP/s of every step as a share of the GPU's measured matmul rates (also into extra_info)."""
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    lines = ["", f"### fraction of the measured matmul rate (fp32 {fp32 / 1e12:.1f} TFLOP/s, "
                 f"bf16 {bf16 / 1e12:.1f} TFLOP/s; 8192^3 matmuls)", "",
             "| case | provider | step precision | TFLOP/s | of fp32 matmul | of bf16 matmul |",
             "|---|---|---|---|---|---|"]
    for (case, provider), r in RESULTS.items():
        if "median_s" not in r or r.get("flops") is None:
            continue
        rate = r["flops"] / r["median_s"]
        precision = "bf16 autocast" if CASES[case][3] == torch.bfloat16 else "fp32"
        EXTRA[(case, provider)].update(achieved_flops_per_s=rate, matmul_fp32_flops_per_s=fp32,
                                       matmul_bf16_flops_per_s=bf16)
        lines.append(f"| {case} | {provider} | {precision} | {rate / 1e12:.2f} | {rate / fp32:.1%} "
                     f"| {rate / bf16:.1%} |")
    return lines


def eager_flops(case: str, provider: str) -> int:
    """FLOPs of one eager step of ``provider``: from this session's run of it, else counted now."""
    flops = RESULTS.get((case, provider), {}).get("flops")
    if flops is None:
        use_cpu_allocator()
        flops = count_flops(make_train_step(case, provider)[0])
    return flops


def summary() -> list[str]:
    """Markdown: images/s, memory, FLOPs per case and provider, and the targets."""
    lines = ["### per case and provider", "",
             "| case | provider | ms/step | CPU s/step | images/s | first step s | allocator peak MB "
             "| RSS peak rise MB | GFLOP/step |", "|---|---|---|---|---|---|---|---|---|"]
    for case in CASES:
        for provider in EAGER + COMPILED:
            r = RESULTS.get((case, provider))
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {case} | {provider} | {r['skipped']} | | | | | | |")
                continue
            flops = r.get("flops")
            rss = r.get("rss_peak_rise_bytes")
            bound = "" if r.get("exact") else " (upper bound)"
            rss_text = "-" if rss is None else f"{rss / 2**20:.0f}{bound}"
            lines.append(f"| {case} | {provider} | {r['median_s'] * 1e3:.0f} | {r['cpu_s']:.2f} "
                         f"| {r['batch'] / r['median_s']:.2f} "
                         f"| {r['first_step_s']:.1f} | {r['peak_extra_bytes'] / 2**20:.0f} | {rss_text} "
                         f"| {'-' if flops is None else f'{flops / 1e9:.1f}'} |")
    lines += ["", "### targets (reported, not asserted)", ""]
    for case in CASES:
        get = lambda p, case=case: RESULTS.get((case, p), {})  # noqa: E731
        loop, compiled_loop = get("loop"), get("compile_loop")
        for name in ("fast_fused", "fast_fused_chunk1"):
            fast = get(name)
            if "median_s" in loop and "median_s" in fast:
                lines.append(f"- {case}: {name} vs loop speed-up {loop['median_s'] / fast['median_s']:.2f}x "
                             f"wall, {loop['cpu_s'] / fast['cpu_s']:.2f}x CPU time "
                             f"(target >= {'1.5' if ON_GPU else '1.25'}x on cpl); allocator peak {name}/loop "
                             f"{fast['peak_extra_bytes'] / loop['peak_extra_bytes']:.2f} (target <= 1)")
        best = [get(p)["median_s"] for p in ("fast_fused", "fast_fused_chunk1", "compile_fast")
                if "median_s" in get(p)]
        if best and "median_s" in compiled_loop:
            lines.append(f"- {case}: best of fast_fused(_chunk1)/compile_fast {min(best) * 1e3:.0f} ms vs "
                         f"compile_loop "
                         f"{compiled_loop['median_s'] * 1e3:.0f} ms (target: not slower)")
    if ON_GPU:
        lines += _gpu_rate_lines()
    allocator = ("cpl_fast.memory's caching CPU allocator (emptied before each provider)"
                 if CPU_ALLOCATOR == "caching" else "the system allocator (glibc)")
    where = f"CPU tensors from {allocator}; `CPR_STEP_CPU_ALLOCATOR=caching|system`."
    if ON_GPU:
        where = (f"GPU: {torch.cuda.get_device_name()}, float32 weights, cuDNN TF32 "
                 f"{torch.backends.cudnn.allow_tf32}, matmul precision "
                 f"{torch.get_float32_matmul_precision()}.")
    lines += ["", where,
              "", f"Rounds: {ROUNDS} after one warm-up step. CPU s/step: the process's CPU time per step "
              "(median over the rounds; on one thread the step's own compute, which other work sharing the "
              "processor inflates far less than wall time; on several threads it also counts their waiting). "
              "FLOPs of compiled providers: those of their "
              f"eager counterparts. FLOPs: {RULE}. Allocator peak: conftest's profiler-based count; "
              "RSS: fresh-process high-water rise "
              "(gradients and Adam state included).", ""]
    return lines


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--rss":
    _rss_main(sys.argv[2], sys.argv[3])

"""Speed and peak memory of the fused backbone ops, and of the backbone's L1 training step, against the
reference composites and torch.compile of them.

Ops (groups ``<op>-fwd|bwd|full``), at the shapes the ``cpl`` model (dim 48, 64x64 crops, batch 2) gives them:

* ``channel_layernorm``: the with-bias norm of encoder level 1 (48 channels, 64x64), decoder level 1
  (96, 64x64) and the latent (384, 8x8);
* ``gated_gelu``: the feed-forward gate of the same three places (2 x 127, 2 x 255, 2 x 1021 channels);
* ``pointwise_conv``: ``qkv`` of level 1 (48 -> 144), ``project_in`` of decoder level 1 (96 -> 510) and
  ``project_out`` of decoder level 1 (255 -> 96);
* ``channel_attention``: the MDTA core of decoder level 1 (1 head of 96 channels, 64x64), level 2 (2 x 48,
  32x32) and level 3 (4 x 48, 16x16);
* ``depthwise_conv3x3``: the FFN's ``dwconv`` of decoder level 1 (510 channels, 64x64), ``qkv_dwconv`` of
  encoder level 1 (144, 64x64), the FFN's ``dwconv`` of level 3 (1020, 16x16) and of the latent (2042, 8x8).

Providers: ``reference`` (cpl_fast.ops._reference: the published composite, ``F.conv2d`` for the 1x1
convolution), ``compile`` (torch.compile of the reference), and the fused backends ``cpu``, ``triton`` and
``cuda`` (each skipped with the dispatcher's reasons where it cannot run; ``triton`` and ``cuda`` carry the
``gpu`` marker; ``depthwise_conv3x3`` has the ``cpu`` one only). ``pointwise_conv`` has one fused
provider, ``gemm`` (the batched GEMM the model uses on the CPU; on a GPU the model keeps ``F.conv2d``), ``channel_attention`` one too, ``written`` (the written-out
backward the model uses). ``fwd`` times the forward without autograd; ``bwd`` the backward
alone (the forward runs in the round's setup); ``full`` both.

Backbone step (group ``backbone_step-full``): forward, L1 loss, backward and Adam of the ``cpl`` model
(``SparsePromptIR``, top-1 routing) on 64x64 crops, batch 2, and 128x128, batch 1. Providers ``reference``
(every block on the published composites: ``set_backbone_ops(model, "reference")``), ``fused`` (the default
model) and ``compile`` (torch.compile of the reference model; its first, compiling step is not timed). CPU
tensors come from ``cpl_fast.memory``'s caching allocator, as in ``cpl-train``. Besides the wall-clock median
the process's CPU time per step is recorded: on one thread it is the step's own compute and stays honest when
other work shares the processor.

Peak memory: the extra bytes PyTorch's allocator hands out during one call (bench/conftest.py). Bytes
moved (``channel_layernorm``, ``gated_gelu``: memory-bound): what any implementation must read and write;
each case's median is set against the measured copy bandwidth in a table under the results (the fraction a
GPU run of scripts/gpu_check.sh reports for the Triton and CUDA kernels).

Run with ``OMP_NUM_THREADS=1 pytest bench/test_backbone_ops.py`` (and ``=2``); ``BACKBONE_ROUNDS`` timed
rounds per op case (default 20) and ``BACKBONE_STEP_ROUNDS`` per step case (default 3). The last test writes
the targets (met or not) under the tables; nothing here asserts a speed.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from gpu_marks import fused_provider  # bench/gpu_marks.py (pytest puts bench/ on sys.path)

from cpl_fast import memory
from cpl_fast.models import build_model
from cpl_fast.models.restormer import set_backbone_ops
from cpl_fast.ops import (
    channel_attention,
    channel_attention_reference,
    channel_layernorm,
    channel_layernorm_reference,
    depthwise_conv3x3,
    depthwise_conv3x3_reference,
    gated_gelu,
    gated_gelu_reference,
    pointwise_conv_reference,
)
from cpl_fast.ops.channel_layernorm import DISPATCHER as LN_DISPATCHER
from cpl_fast.ops.depthwise_conv import DISPATCHER as DW_DISPATCHER
from cpl_fast.ops.gated_gelu import DISPATCHER as GELU_DISPATCHER
from cpl_fast.ops.pointwise_conv import pointwise_conv_gemm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = int(os.environ.get("BACKBONE_ROUNDS", "20"))
STEP_ROUNDS = int(os.environ.get("BACKBONE_STEP_ROUNDS", "3"))
BATCH, CROP = 2, 64
LN_CASES = {"enc1": (48, CROP), "dec1": (96, CROP), "latent": (384, CROP // 8)}
GELU_CASES = {"enc1": (127, CROP), "dec1": (255, CROP), "latent": (1021, CROP // 8)}
PW_CASES = {"enc1 qkv": (48, 144, CROP), "dec1 project_in": (96, 510, CROP),
            "dec1 project_out": (255, 96, CROP)}
ATTN_CASES = {"dec1": (1, 96, CROP), "level2": (2, 48, CROP // 2), "level3": (4, 48, CROP // 4)}
DW_CASES = {"dec1 dwconv": (510, CROP), "enc1 qkv_dwconv": (144, CROP), "level3 dwconv": (1020, CROP // 4),
            "latent dwconv": (2042, CROP // 8)}
STEP_CASES = {"cpl 64px b2": (64, 2), "cpl 128px b1": (128, 1)}
MODES = ("fwd", "bwd", "full")

_measured: dict[tuple[str, str, str, str], dict] = {}    # (op, mode, case, provider) -> numbers


def _providers(dispatcher):
    fused = [fused_provider(dispatcher, name, DEVICE) for name in ("cpu", "triton", "cuda")]
    return ["reference", "compile", *fused]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _ln_inputs(case):
    channels, size = LN_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, channels, size, size, generator=gen).to(DEVICE)
    weight = (torch.rand(channels, generator=gen) + 0.5).to(DEVICE)
    bias = (torch.randn(channels, generator=gen) * 0.1).to(DEVICE)
    return [x, weight, bias]


def _gelu_inputs(case):
    hidden, size = GELU_CASES[case]
    return [torch.randn(BATCH, 2 * hidden, size, size, generator=torch.Generator().manual_seed(0)).to(DEVICE)]


def _pw_inputs(case):
    cin, cout, size = PW_CASES[case]
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH, cin, size, size, generator=gen).to(DEVICE),
            (torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(DEVICE)]


def _attn_inputs(case):
    heads, channels, size = ATTN_CASES[case]
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(BATCH, heads, channels, size * size, generator=gen).to(DEVICE) for _ in range(3)]
    return [*qkv, (torch.rand(heads, 1, 1, generator=gen) + 0.5).to(DEVICE)]


def _dw_inputs(case):
    channels, size = DW_CASES[case]
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH, channels, size, size, generator=gen).to(DEVICE),
            (torch.randn(channels, 1, 3, 3, generator=gen) / 3).to(DEVICE)]


def _bytes_moved(op, inputs, mode):
    """The least bytes one call must read and write (memory-bound ops only; None otherwise)."""
    x = inputs[0]
    element = x.element_size()
    if op == "channel_layernorm":
        forward, backward = 2 * x.numel() * element, 3 * x.numel() * element
    elif op == "gated_gelu":
        forward, backward = 1.5 * x.numel() * element, 2.5 * x.numel() * element
    else:
        return None
    return int({"fwd": forward, "bwd": backward, "full": forward + backward}[mode])


def _run_op(benchmark, peak_memory, copy_bandwidth, op, case, provider, mode, fn, inputs):
    leaves = [t.requires_grad_(mode != "fwd") for t in inputs]
    probe = fn(*leaves)
    grad_out = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    del probe

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_out)
        _sync()

    def forward():
        with torch.no_grad():
            out = fn(*leaves)
        _sync()
        return out

    def setup():
        for t in leaves:
            t.grad = None
        return (fn(*leaves),), {}

    def backward(out):
        out.backward(grad_out)
        _sync()

    for _ in range(3):       # compilation and allocator warm-up stay out of the timings
        forward_backward() if mode != "fwd" else forward()
    benchmark.group = f"{op}-{mode}"
    if mode == "bwd":
        out = setup()[0][0]
        peak = peak_memory(lambda: backward(out))
        del out
        benchmark.pedantic(backward, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    else:
        step = forward if mode == "fwd" else forward_backward
        peak = peak_memory(step)
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    median = benchmark.stats.stats.median
    moved = _bytes_moved(op, inputs, mode)
    info = dict(case=case, provider=provider, device=str(DEVICE), peak_extra_bytes=peak)
    if moved is not None:
        info.update(bytes_moved=moved, copy_bandwidth_bytes_per_s=copy_bandwidth,
                    of_copy_bandwidth=round(moved / median / copy_bandwidth, 4))
    benchmark.extra_info.update(info)
    _measured[(op, mode, case, provider)] = {"median": median, "peak": peak, "bytes_moved": moved,
                                             "copy_bandwidth": copy_bandwidth}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", _providers(LN_DISPATCHER))
@pytest.mark.parametrize("case", list(LN_CASES))
def test_channel_layernorm(benchmark, peak_memory, copy_bandwidth, op_provider, case, provider, mode):
    fn = op_provider(provider, channel_layernorm_reference,
                     lambda name: (lambda x, w, b: channel_layernorm(x, w, b, backend=name)))
    _run_op(benchmark, peak_memory, copy_bandwidth, "channel_layernorm", case, provider, mode, fn,
            _ln_inputs(case))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", _providers(GELU_DISPATCHER))
@pytest.mark.parametrize("case", list(GELU_CASES))
def test_gated_gelu(benchmark, peak_memory, copy_bandwidth, op_provider, case, provider, mode):
    fn = op_provider(provider, gated_gelu_reference, lambda name: (lambda x: gated_gelu(x, backend=name)))
    _run_op(benchmark, peak_memory, copy_bandwidth, "gated_gelu", case, provider, mode, fn,
            _gelu_inputs(case))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "compile", "gemm"])
@pytest.mark.parametrize("case", list(PW_CASES))
def test_pointwise_conv(benchmark, peak_memory, copy_bandwidth, op_provider, case, provider, mode):
    fn = op_provider(provider, pointwise_conv_reference, lambda name: pointwise_conv_gemm)
    _run_op(benchmark, peak_memory, copy_bandwidth, "pointwise_conv", case, provider, mode, fn,
            _pw_inputs(case))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "compile", "written"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_channel_attention(benchmark, peak_memory, copy_bandwidth, op_provider, case, provider, mode):
    fn = op_provider(provider, channel_attention_reference, lambda name: channel_attention)
    _run_op(benchmark, peak_memory, copy_bandwidth, "channel_attention", case, provider, mode, fn,
            _attn_inputs(case))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "compile", fused_provider(DW_DISPATCHER, "cpu", DEVICE)])
@pytest.mark.parametrize("case", list(DW_CASES))
def test_depthwise_conv3x3(benchmark, peak_memory, copy_bandwidth, op_provider, case, provider, mode):
    fn = op_provider(provider, depthwise_conv3x3_reference,
                     lambda name: lambda x, w: depthwise_conv3x3(x, w, backend=name))
    _run_op(benchmark, peak_memory, copy_bandwidth, "depthwise_conv3x3", case, provider, mode, fn,
            _dw_inputs(case))


# --- the backbone's L1 step ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_allocator():
    """cpl_fast.memory's caching allocator for the step cases (CPU only), emptied between providers."""
    enabled = DEVICE.type == "cpu" and memory.cpu_caching_available()
    if enabled:
        memory.enable_cpu_caching()
    yield enabled
    if enabled:
        memory.disable_cpu_caching()


@pytest.mark.parametrize("provider", ["reference", "fused", "compile"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_backbone_step(benchmark, peak_memory, cpu_allocator, case, provider):
    size, batch = STEP_CASES[case]
    torch.manual_seed(0)
    model = build_model("cpl").to(DEVICE)
    if provider != "fused":
        set_backbone_ops(model, "reference")
    # dynamic=False: each case compiles for its own shapes (a second shape would otherwise trigger a
    # dynamic-shape recompile, which inductor of torch 2.13 fails on for this model).
    forward = torch.compile(model, dynamic=False) if provider == "compile" else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen).to(DEVICE)
    target = torch.rand(batch, 3, size, size, generator=gen).to(DEVICE)
    cpu_seconds: list[float] = []

    def step():
        started = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = (forward(x) - target).abs().mean()
        loss.backward()
        optimizer.step()
        _sync()
        cpu_seconds.append(time.process_time() - started)

    if cpu_allocator:
        memory.empty_cpu_cache()
    started = time.perf_counter()
    step()                                   # warm-up (the compiling step for ``compile``)
    first = time.perf_counter() - started
    peak = peak_memory(step)
    cpu_seconds.clear()
    benchmark.group = "backbone_step-full"
    benchmark.pedantic(step, rounds=STEP_ROUNDS, warmup_rounds=0)
    cpu = sorted(cpu_seconds)[len(cpu_seconds) // 2]
    benchmark.extra_info.update(case=case, provider=provider, device=str(DEVICE), peak_extra_bytes=peak,
                                cpu_seconds_median=cpu, first_step_seconds=round(first, 2),
                                threads=torch.get_num_threads())
    _measured[("backbone_step", "full", case, provider)] = {"median": benchmark.stats.stats.median,
                                                           "peak": peak, "cpu": cpu}


# --- targets ---------------------------------------------------------------------------------------

def _op_targets(op: str, fused: str) -> list[str]:
    lines = []
    for case in {k[2] for k in _measured if k[0] == op}:
        full = {p: _measured.get((op, "full", case, p)) for p in ("reference", "compile", fused)}
        if None in full.values():
            continue
        speedup = full["reference"]["median"] / full[fused]["median"]
        over_compile = full["compile"]["median"] / full[fused]["median"]
        peak_ok = full[fused]["peak"] <= full["reference"]["peak"]
        verdict = "met" if speedup >= 2 else "MISSED"
        lines.append(f"- {op} {case}: fwd+bwd {speedup:.2f}x the eager reference ({verdict}: >= 2x), "
                     f"{over_compile:.2f}x torch.compile of it; peak extra memory "
                     f"{full[fused]['peak'] / 2**20:.1f} MB vs {full['reference']['peak'] / 2**20:.1f} MB "
                     f"({'met' if peak_ok else 'MISSED'}: not higher)")
    return sorted(lines)


def _step_targets() -> list[str]:
    threads = torch.get_num_threads()
    goal = 1.4 if threads == 1 else 1.2
    lines = []
    for case in STEP_CASES:
        r = {p: _measured.get(("backbone_step", "full", case, p)) for p in ("reference", "fused", "compile")}
        if r["reference"] is None or r["fused"] is None:
            continue
        wall = r["reference"]["median"] / r["fused"]["median"]
        cpu = r["reference"]["cpu"] / r["fused"]["cpu"]
        plural = "s" if threads > 1 else ""
        speed = "met" if wall >= goal else "MISSED"
        peak = "met" if r["fused"]["peak"] <= r["reference"]["peak"] else "MISSED"
        line = (f"- backbone step {case}, {threads} thread{plural}: fused {wall:.2f}x the reference ops by "
                f"wall clock, {cpu:.2f}x by CPU time ({speed}: >= {goal}x); peak extra memory "
                f"{r['fused']['peak'] / 2**20:.0f} MB vs {r['reference']['peak'] / 2**20:.0f} MB "
                f"({peak}: not higher)")
        if r["compile"] is not None:
            over = r["compile"]["median"] / r["fused"]["median"]
            line += (f"; {over:.2f}x torch.compile of the reference ({'met' if over >= 1 else 'MISSED'}: "
                     f">= 1x)")
        lines.append(line)
    return lines


@pytest.fixture(scope="module", autouse=True)
def write_notes(bench_notes, bandwidth_lines):
    """After the last case: the share of the copy bandwidth of the memory-bound ops, under their tables."""
    yield
    for op in ("channel_layernorm", "gated_gelu"):
        rows = [(f"{case} {mode}", provider, r["median"], r["bytes_moved"])
                for (o, mode, case, provider), r in _measured.items() if o == op and r["bytes_moved"]]
        if rows:
            bandwidth = next(r["copy_bandwidth"] for (o, *_), r in _measured.items() if o == op)
            bench_notes[op].extend(["", *bandwidth_lines(rows, bandwidth)])


def test_backbone_targets(bench_notes):
    """Not an assertion of speed: records which targets were met in this run, under each table."""
    fused = "cpu" if DEVICE.type == "cpu" else "cuda"
    load = os.getloadavg()
    load_line = (f"Load average at the targets (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
                 f"on {os.cpu_count()} cores.")
    written = 0
    for op, name in (("channel_layernorm", fused), ("gated_gelu", fused), ("pointwise_conv", "gemm"),
                     ("channel_attention", "written"), ("depthwise_conv3x3", fused)):
        lines = _op_targets(op, name)
        if lines:
            bench_notes[op].extend(["", f"### Targets ({name} provider)", "", *lines, "", load_line])
            written += 1
    lines = _step_targets()
    if lines:
        bench_notes["backbone_step"].extend(["", "### Targets", "", *lines, "", load_line,
                                             "Peak extra memory: bytes handed out by PyTorch's allocator "
                                             "during one step (bench/conftest.py)."])
        written += 1
    if not written:
        pytest.skip("needs the reference, compile and fused cases of an op or of the step in one run")

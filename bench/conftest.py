"""Shared setup of the benchmarks (``pytest bench/``) and the writer of ``bench/results/``.

Fixtures: ``device`` (CUDA when present, else CPU), ``sync`` (waits for the device, so timings of
GPU work are honest), ``peak_memory`` (peak extra bytes a call allocates, see below),
``copy_bandwidth`` and ``bandwidth_lines`` (see below), ``bench_notes`` (lines a benchmark module
adds to its results file) and ``op_provider`` (the function an op benchmark times for a provider).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory allocated before the
call. On the CPU, ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
of PyTorch's CPU allocator (tensors made by ATen, by compiled extensions and by inductor's code);
the running sum of those events, in time order, peaks at the call's peak extra memory. Memory that
does not come from PyTorch's allocator (a ``malloc`` inside a kernel) is not seen, so kernels here
take their scratch space from ATen.

Bandwidth: ``copy_bandwidth`` is the device's measured copy rate (bytes read plus bytes written per
second by ``Tensor.copy_`` of a 256 MiB buffer, best of 10), the yardstick of memory-bound ops: an op
that must read and write ``n`` bytes cannot take less than ``n / copy_bandwidth`` seconds.
``bandwidth_lines(rows, bandwidth)`` turns ``(case, provider, seconds, bytes)`` rows into a markdown
table of that share.

At the end of the session, for every op with groups named ``<op>-fwd|bwd|full``, the hook writes
``bench/results/<op>_<device>_<date>.json`` (every benchmark's statistics and extra_info) and
``bench/results/<op>_<device>.md`` (median times and peak memory per case and provider); ``<device>`` is
``cpu-<n>threads`` for a CPU run on fewer threads than the machine has. ``CPL_BENCH_RESULTS=DIR`` writes
them into DIR instead (scripts/gpu_check.py collects a GPU run's results that way).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

RESULTS = Path(os.environ.get("CPL_BENCH_RESULTS") or Path(__file__).parent / "results")
GROUP = re.compile(r"^(?P<op>\w+)-(?P<mode>fwd|bwd|full)$")
_NOTES: dict[str, list[str]] = defaultdict(list)


def device_name(device: torch.device) -> str:
    """The processor or GPU the benchmarks ran on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads != 1 else ''}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def sync(device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _cpu_peak_extra(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type()
              == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@pytest.fixture(scope="session")
def peak_memory(device) -> Callable[[Callable[[], object]], int]:
    """``peak_memory(fn)``: the peak extra bytes allocated while ``fn()`` runs (its result freed after)."""
    def measure(fn: Callable[[], object]) -> int:
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            result = fn()
            torch.cuda.synchronize()
            del result
            return torch.cuda.max_memory_allocated() - base
        return _cpu_peak_extra(fn)
    return measure


@functools.cache
def measure_copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Bytes read plus bytes written per second by ``dst.copy_(src)`` of ``nbytes`` (best of ``repeats``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)                                    # first touch and allocator warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            started = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - started
        best = min(best, seconds)
    return 2 * nbytes / best


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """The device's measured copy bandwidth in bytes per second (see the module docstring)."""
    return measure_copy_bandwidth(device)


def _bandwidth_lines(rows: list[tuple[str, str, float, int]], bandwidth: float) -> list[str]:
    """Markdown: per ``(case, provider, seconds, bytes)``, the GB/s reached and its share of ``bandwidth``."""
    lines = [f"### bytes each case must move, and the share of the measured copy bandwidth "
             f"({bandwidth / 1e9:.0f} GB/s, read + write)", "",
             "| case | provider | median ms | MB moved | GB/s | of copy bandwidth |",
             "|---|---|---|---|---|---|"]
    for case, provider, seconds, nbytes in rows:
        rate = nbytes / seconds
        lines.append(f"| {case} | {provider} | {seconds * 1e3:.3f} | {nbytes / 1e6:.1f} | {rate / 1e9:.0f} "
                     f"| {rate / bandwidth:.0%} |")
    return lines + [""]


@pytest.fixture(scope="session")
def bandwidth_lines() -> Callable[[list[tuple[str, str, float, int]], float], list[str]]:
    """``bandwidth_lines(rows, bandwidth)``: markdown lines, see the module docstring."""
    return _bandwidth_lines


@pytest.fixture(scope="session")
def bench_notes() -> dict[str, list[str]]:
    """``bench_notes[op]``: markdown lines appended to the op's results table."""
    return _NOTES


def _op_provider(name: str, reference: Callable, fused: Callable[[str], Callable]) -> Callable:
    if name == "reference":
        return reference
    if name == "compile":
        return torch.compile(reference, dynamic=False)
    return fused(name)


@pytest.fixture(scope="session")
def op_provider() -> Callable[[str, Callable, Callable[[str], Callable]], Callable]:
    """``op_provider(name, reference, fused)``: what an op benchmark times for provider ``name``: the
    plain-PyTorch ``reference``, ``compile`` (torch.compile of it, static shapes: each case compiles for
    its own), or ``fused(name)`` for a fused backend. Every op table has these columns, in this order."""
    return _op_provider


def _percentile(data: list[float], q: float) -> float:
    ordered = sorted(data)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _record(bench) -> dict:
    data = list(bench.stats.data)
    return {
        "name": bench.name, "group": bench.group, "extra_info": dict(bench.extra_info),
        "rounds": bench.stats.rounds, "iterations": bench.iterations,
        "seconds": {"min": bench.stats.min, "median": bench.stats.median, "mean": bench.stats.mean,
                    "p20": _percentile(data, 0.2), "p50": _percentile(data, 0.5), "p80": _percentile(data, 0.8)},
    }


def _table(records: list[dict]) -> list[str]:
    """Median ms (p20-p80) and peak extra MB per case (rows) and provider (columns), one table per mode."""
    lines = []
    for group in sorted({r["group"] for r in records}):
        rows = [r for r in records if r["group"] == group]
        providers = list(dict.fromkeys(r["extra_info"].get("provider", r["name"]) for r in rows))
        cases = list(dict.fromkeys(r["extra_info"].get("case", r["name"]) for r in rows))
        cell = {(r["extra_info"].get("case", r["name"]), r["extra_info"].get("provider", r["name"])): r for r in rows}
        lines += [f"### {group}: median ms (p20-p80), peak extra memory MB", "",
                  "| case | " + " | ".join(providers) + " |", "|---|" + "---|" * len(providers)]
        for case in cases:
            cells = []
            for provider in providers:
                r = cell.get((case, provider))
                if r is None:
                    cells.append("-")
                    continue
                s = r["seconds"]
                memory = r["extra_info"].get("peak_extra_bytes")
                mb = f"; {memory / 2**20:.1f} MB" if memory is not None else ""
                cells.append(f"{s['median'] * 1e3:.2f} ({s['p20'] * 1e3:.2f}-{s['p80'] * 1e3:.2f}){mb}")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is None or bench_session.disabled:
        return
    by_op: dict[str, list[dict]] = defaultdict(list)
    for bench in bench_session.benchmarks:
        match = GROUP.match(bench.group or "")
        if match and bench.stats and bench.stats.rounds:
            by_op[match["op"]].append(_record(bench))
    if not by_op:
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # A run on fewer threads than the machine has (OMP_NUM_THREADS) gets its own files.
    tag = dev.type if dev.type == "cuda" or torch.get_num_threads() == os.cpu_count() else (
        f"{dev.type}-{torch.get_num_threads()}threads")
    today = datetime.date.today().isoformat()
    command = "pytest " + " ".join(session.config.invocation_params.args)
    # The load average tells how much other work shared the processor while the timings were taken.
    header = {"device": device_name(dev), "date": today, "command": command, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_average_1_5_15min": list(os.getloadavg())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for op, records in by_op.items():
        notes = _NOTES.get(op, [])
        (RESULTS / f"{op}_{tag}_{today}.json").write_text(
            json.dumps({**header, "notes": notes, "benchmarks": records}, indent=2) + "\n")
        text = [f"# {op} benchmark ({tag})", "",
                f"- device: {header['device']}", f"- date: {today}", f"- command: `{command}`",
                f"- torch {torch.__version__}",
                "- load average at the end (1, 5, 15 min): "
                + ", ".join(f"{v:.2f}" for v in header["load_average_1_5_15min"]), "", *_table(records), *notes, ""]
        (RESULTS / f"{op}_{tag}.md").write_text("\n".join(text))

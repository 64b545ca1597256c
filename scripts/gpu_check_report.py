"""What scripts/gpu_check.py makes of its phases' outputs: outcomes, one-line results, JSON and markdown.

A pytest phase's outcome comes from its JUnit XML (``--junitxml``), or, when the phase was killed
before pytest wrote it, from the ``-v`` lines of its log. A benchmark phase's numbers come from the
files bench/conftest.py writes into ``CPL_BENCH_RESULTS`` (``<op>_<device>_<date>.json`` and
``<op>_<device>.md``).
"""
from __future__ import annotations

import json
import math
import re
import shlex
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

VERBOSE_LINE = re.compile(r"^\S+::\S+.* (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.MULTILINE)
SUMMARY_LINE = re.compile(r"^=*\s*(\d+ \w+.*) in [\d.]+s", re.MULTILINE)


def pytest_outcome(junit: Path, output: str) -> dict:
    """Counts, failures and skip reasons of one pytest run."""
    outcome: dict = {"collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                     "skip_reasons": {}, "failures": [], "source": "junit"}
    summary = SUMMARY_LINE.findall(output)
    if summary:
        outcome["pytest_summary"] = summary[-1].strip(" =")
    if not junit.is_file():   # killed before the end: count the -v lines written so far
        counts = Counter(VERBOSE_LINE.findall(output))
        outcome.update(source="log (no JUnit XML: the run did not finish)", collected=sum(counts.values()),
                       passed=counts["PASSED"] + counts["XFAIL"] + counts["XPASS"], failed=counts["FAILED"],
                       errors=counts["ERROR"], skipped=counts["SKIPPED"])
        return outcome
    reasons: Counter = Counter()
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome["collected"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            outcome["failed" if failure is not None else "errors"] += 1
            message = (node.get("message") or node.text or "").strip().splitlines()
            outcome["failures"].append({"test": name, "message": message[0][:300] if message else ""})
        elif skipped is not None:
            outcome["skipped"] += 1
            reasons[(skipped.get("message") or "").strip()[:300]] += 1
        else:
            outcome["passed"] += 1
    outcome["skip_reasons"] = dict(reasons.most_common())
    return outcome


def bench_outcome(results: Path) -> dict:
    """``{op: {"benchmarks": [...], "notes": [...], "markdown": text}}`` of one benchmark run."""
    ops: dict = {}
    for path in sorted(results.glob("*_*.json")):
        data = json.loads(path.read_text())
        op = path.name.split("_cuda")[0].split("_cpu")[0]
        markdown = next(iter(sorted(results.glob(f"{op}_*.md"))), None)
        ops[op] = {"device": data.get("device"), "torch": data.get("torch"),
                   "benchmarks": data.get("benchmarks", []), "notes": data.get("notes", []),
                   "markdown": markdown.read_text() if markdown else ""}
    return ops


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def op_bench_line(benchmarks: list[dict], case_key: str) -> str:
    """Per fused backend timed: median share of the copy bandwidth, mean speed-up over torch.compile."""
    by = {(b["extra_info"].get(case_key), b["extra_info"].get("provider")): b for b in benchmarks}
    parts = []
    for provider in ("cuda", "triton", "cpu"):
        mine = {case: b for (case, p), b in by.items() if p == provider}
        if not mine:
            continue
        shares = [b["extra_info"]["of_copy_bandwidth"] for b in mine.values()
                  if "of_copy_bandwidth" in b["extra_info"]]
        speedups = [by[(case, "compile")]["seconds"]["median"] / b["seconds"]["median"]
                    for case, b in mine.items() if (case, "compile") in by]
        part = f"{provider}: {_median(shares):.0%} of copy bandwidth (median of {len(mine)} cases)"
        if speedups:
            part += f", {_geomean(speedups):.2f}x torch.compile (geometric mean)"
        parts.append(part)
    return "; ".join(parts) or "no fused backend timed"


def cpr_step_line(benchmarks: list[dict]) -> str:
    """Per GPU case: ms/step of each provider timed, fast vs loop, achieved share of the matmul rate."""
    by_case: dict[str, dict[str, dict]] = {}
    for b in benchmarks:
        info = b["extra_info"]
        if "median_s" in info:
            by_case.setdefault(info["case"], {})[info["provider"]] = info
    parts = []
    for case, providers in by_case.items():
        bf16 = case.endswith("bf16")
        cells = [f"{p} {r['median_s'] * 1e3:.0f} ms" for p, r in providers.items()]
        loop, fast = providers.get("loop"), providers.get("fast_fused")
        if loop and fast:
            cells.append(f"fast/loop {loop['median_s'] / fast['median_s']:.2f}x")
        precision = "bf16" if bf16 else "fp32"
        for p, r in providers.items():
            rate, matmul = r.get("achieved_flops_per_s"), r.get(f"matmul_{precision}_flops_per_s")
            if rate and matmul and p in ("fast_fused", "compile_fast", "compile_loop"):
                cells.append(f"{p} {rate / 1e12:.1f} TFLOP/s = {rate / matmul:.0%} of {precision} matmul")
        parts.append(f"{case}: " + ", ".join(cells))
    return "; ".join(parts) or "no step timed"


def result_line(phase: dict) -> str:
    """The phase's one-line result for the summary table."""
    details = phase.get("details", {})
    if phase["status"] == "skipped":
        return phase.get("reason", "")
    if phase.get("note"):      # a background phase stopped as planned: its timings mean nothing
        return phase["note"]
    if phase["kind"] == "build":
        found = details.get("build", {})
        if found.get("problems"):
            return found["problems"][0][:160]
        config = found.get("build_config")
        if config:
            cuda = "yes" if config.get("cuda") else "no"
            arch = config.get("torch_cuda_arch_list")
            return f"built: CUDA kernels {cuda} ({config.get('cuda_reason')}), arch {arch}"
        return (f"toolchain ok: torch {found.get('torch')}, setuptools {found.get('setuptools')}, "
                f"ninja {found.get('ninja')}, nvcc {'found' if found.get('nvcc') else 'not found'}")
    if phase["kind"] == "info":
        info = details.get("info", {})
        cuda = info.get("backends", {}).get("cuda")
        if not info:
            return "no report"
        if cuda is None:
            return f"extension: {info.get('extension')}; no CUDA device"
        ready = []
        for op, backends in cuda.items():
            fast = [b for b, why in backends.items() if not why and b != "reference"]
            ready.append(f"{op}: {', '.join(fast) or 'reference only'}")
        devices = ", ".join(info.get("cuda_devices", []))
        return f"extension: {info.get('extension')}; on {devices}: " + "; ".join(ready)
    outcome = details.get("pytest", {})
    failed = outcome.get("failed", 0) + outcome.get("errors", 0)
    counts = f"{outcome.get('passed', 0)} passed, {failed} failed, {outcome.get('skipped', 0)} skipped"
    if phase.get("dry"):
        reasons = list(outcome.get("skip_reasons", {}))
        why = f" ({reasons[0][:70]})" if reasons else ""
        return f"{outcome.get('collected', 0)} collected, {counts}{why}"
    bench = details.get("bench", {})
    lines = []
    for op, data in bench.items():
        if op == "cpr_step":
            lines.append(cpr_step_line(data["benchmarks"]))
        else:
            lines.append(op_bench_line(data["benchmarks"], "layer" if op == "cpr_distances" else "case"))
    if outcome.get("failures"):
        lines.append(f"first failure: {outcome['failures'][0]['test']}")
    return "; ".join([counts] + lines)


def table_lines(run: dict) -> list[str]:
    """The summary table printed last: one row per phase."""
    rows = [("phase", "status", "time / limit", "result")]
    for phase in run["phases"]:
        limit = f"{phase['limit_s']:.0f}" if phase.get("limit_s") is not None else "-"
        time_used = f"{phase.get('seconds', 0):.0f} / {limit} s"
        rows.append((phase["name"], phase["status"], time_used, result_line(phase)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]


def write_json(path: Path, run: dict) -> None:
    path.write_text(json.dumps(run, indent=2, default=str) + "\n")


def write_markdown(path: Path, run: dict) -> None:
    mode = "CPU rehearsal (--dry-run)" if run["dry_run"] else "GPU run"
    lines = [f"# GPU check: {mode}", "", f"- started: {run['started']}", f"- host: {run['host']}",
             f"- total: {run['total_s']:.0f} s of a {run['budget_s']:.0f} s budget", "",
             "```", *table_lines(run), "```", ""]
    for phase in run["phases"]:
        lines += [f"## {phase['name']}: {phase['status']}", ""]
        if phase.get("problem"):
            lines += [f"Problem: {phase['problem']}", ""]
        if phase.get("command"):
            lines += [f"`{shlex.join(phase['command'])}`", ""]
        outcome = phase.get("details", {}).get("pytest", {})
        for failure in outcome.get("failures", [])[:30]:
            lines.append(f"- FAILED {failure['test']}: {failure['message']}")
        for reason, count in list(outcome.get("skip_reasons", {}).items())[:10]:
            lines.append(f"- skipped ({count}): {reason}")
        for data in phase.get("details", {}).get("bench", {}).values():
            lines += ["", data["markdown"]]
        if phase["status"] not in ("ok", "skipped") and phase.get("output_tail"):
            lines += ["", "```", phase["output_tail"][-3000:], "```"]
        lines.append("")
    path.write_text("\n".join(lines))

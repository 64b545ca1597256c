"""GPU validation in one call: build, GPU tests, GPU benchmarks, every phase under a time limit.

``bash scripts/gpu_check.sh [--dry-run] [OUTPUT_DIR]`` (default ``gpu_results/``), from the repository root.

Phases, in order (:data:`PHASES`). Each runs as a child process in its own process group, which is
killed at the phase's limit; a phase that fails or runs out of time is recorded and the next one
runs, so one call always comes back with results. A phase's limit is its cap, cut short where the
run's budget (:data:`BUDGET_S`, inside 9 minutes) minus the floors kept for the later phases is
less; a phase left with no time is reported as skipped.

* ``build``: toolchain checks, then ``pip install --no-build-isolation --no-deps -e .`` with
  ``TORCH_CUDA_ARCH_LIST=9.0`` and ``MAX_JOBS`` = cores (scripts/gpu_check_build.py); ``info``: ``cpl-info``.
* ``prewarm_compile``: in the background while the tests run, the compiled CPR steps' first step, so
  that Inductor's and Triton's on-disk caches are warm for the compiled phases at the end (a cold
  compile of the whole model takes minutes); stopped before the first benchmark, timings discarded.
* ``tests``: ``pytest tests/test_gpu.py -m gpu`` (the cuda and triton backends against the reference,
  opcheck on CUDA tensors, the fast step equal to the literal one); ``tests_backbone_ops``: the ``gpu``
  cases of tests/test_channel_layernorm.py, tests/test_gated_gelu.py (cuda and triton on the device) and
  tests/test_channel_attention.py (its written-out backward on CUDA tensors).
* ``bench_prompt_mix``, ``bench_cpr_distances``: the op benchmarks on the GPU (time, share of the copy
  bandwidth, against the references and torch.compile); ``bench_backbone_ops``: the ``gpu`` cases of
  bench/test_backbone_ops.py (channel_layernorm and gated_gelu on cuda and triton: time, share of the copy
  bandwidth); ``bench_cpr_step``: the CPR step of the ``cpl``
  model at 128x128, batch 4, fast vs loop, fp32 and bf16 autocast; ``bench_cpr_step_compile_fast`` and
  ``bench_cpr_step_compile_loop``: the compiled steps, last, each in its own process (one that still
  does not fit reports its timeout).

Output folder, six files: ``gpu_check.json`` (everything), ``gpu_check.md`` (the table, failures, skip
reasons and the benchmarks' tables), ``build.log``, ``tests.log``, ``bench.log``, ``prewarm.log``. The
last lines printed are the summary table. Exit status 0 when every phase passed. Benchmark results go
to the run's temporary folder (``CPL_BENCH_RESULTS``), never into bench/results/.

``--dry-run`` is the CPU rehearsal CI runs (tests/test_gpu_check.py): every phase runs with a small
limit, the build only checks the toolchain, the pytest phases select their ``gpu`` cases, which must
be collected and all skip with a reason that names CUDA; the same files are written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gpu_check_report as report

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 525.0          # the whole run, 8 min 45 s: inside 9 minutes with the reports written
DRY_LIMIT_S = 90.0        # every phase of the CPU rehearsal
DRY_BUDGET_S = 400.0
OUTPUT_FILES = ("gpu_check.json", "gpu_check.md", "build.log", "tests.log", "bench.log", "prewarm.log")
CORES = os.cpu_count() or 1
# pytest-benchmark: a few rounds suffice on a GPU (each benchmark warms up on its own first).
BENCH_OPTIONS = ("--benchmark-min-rounds=5", "--benchmark-max-time=0.1", "--benchmark-warmup=off")
INFO_CODE = ("import json, sys; from cpl_fast import info; info.main([]); "
             "open(sys.argv[1], 'w').write(json.dumps(info.collect(), indent=2, default=str))")


@dataclass(frozen=True)
class Phase:
    """One step of the check. ``kind``: build | info | pytest; ``args``: pytest's paths and selection."""

    name: str
    kind: str
    log: str
    limit_s: float                # cap of the real run
    floor_s: float = 0.0          # kept for this phase out of the budget while earlier phases run
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    bench: bool = False           # collect its benchmark results, run with BENCH_OPTIONS
    echo: bool = False            # also print the phase's output (cpl-info's report is short)
    background_until: str | None = None   # run beside the next phases, stopped before this one starts


CPR_STEP = "bench/test_cpr_step.py"
COMPILED_ENV = {"CPR_STEP_ROUNDS": "3", "CPR_STEP_COMPILE_LIMIT_S": "100000", "CPR_STEP_BUDGET_S": "100000"}
COMPILED = "(compile_fast or compile_loop) and not bf16"
PHASES = (
    Phase("build", "build", "build.log", 150, 60),
    Phase("info", "info", "build.log", 20, 10, echo=True),
    # Compiling the whole model from a cold cache takes minutes: start it beside the tests (which time
    # nothing), with half the cores, so that the compiled phases at the end find Inductor's and Triton's
    # on-disk caches warm. Stopped before the first benchmark; its own timings are thrown away.
    Phase("prewarm_compile", "pytest", "prewarm.log", 600, 0, (CPR_STEP, "-m", "gpu", "-k", COMPILED),
          {**COMPILED_ENV, "CPR_STEP_ROUNDS": "1", "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, CORES // 2))},
          background_until="bench_prompt_mix"),
    Phase("tests", "pytest", "tests.log", 180, 60, ("tests/test_gpu.py", "-m", "gpu")),
    # The backbone ops' CUDA and Triton backends against the reference on the device (their gpu cases).
    Phase("tests_backbone_ops", "pytest", "tests.log", 90, 20,
          ("tests/test_channel_layernorm.py", "tests/test_gated_gelu.py", "tests/test_channel_attention.py",
           "-m", "gpu")),
    Phase("bench_prompt_mix", "pytest", "bench.log", 90, 30, ("bench/test_prompt_mix.py",), bench=True),
    Phase("bench_cpr_distances", "pytest", "bench.log", 75, 20, ("bench/test_cpr_distances.py",), bench=True),
    # channel_layernorm and gated_gelu on Triton and CUDA (time, share of the copy bandwidth): gpu cases only.
    Phase("bench_backbone_ops", "pytest", "bench.log", 60, 20, ("bench/test_backbone_ops.py", "-m", "gpu"),
          bench=True),
    Phase("bench_cpr_step", "pytest", "bench.log", 75, 30,
          (CPR_STEP, "-m", "gpu", "-k", "(loop or fast_fused) and not compile and not chunk1"),
          {"CPR_STEP_ROUNDS": "5"}, bench=True),
    Phase("bench_cpr_step_compile_fast", "pytest", "bench.log", 240, 0,
          (CPR_STEP, "-m", "gpu", "-k", "compile_fast and not bf16"), COMPILED_ENV, bench=True),
    Phase("bench_cpr_step_compile_loop", "pytest", "bench.log", 240, 0,
          (CPR_STEP, "-m", "gpu", "-k", "compile_loop and not bf16"), COMPILED_ENV, bench=True),
)


def dry_selection(args: Sequence[str]) -> list[str]:
    """The rehearsal's pytest arguments: the same paths and -k, only the ``gpu`` cases (skipped on a CPU)."""
    out, skip_next = [], False
    for arg in args:
        if not skip_next and arg != "-m":
            out.append(arg)
        skip_next = arg == "-m"
    return out + ["-m", "gpu"]


def command_for(phase: Phase, dry: bool, work: Path) -> list[str]:
    python = sys.executable
    if phase.kind == "build":
        return [python, str(ROOT / "scripts" / "gpu_check_build.py"), "--json", str(work / "build.json")] + (
            [] if dry else ["--install"])
    if phase.kind == "info":
        return [python, "-c", INFO_CODE, str(work / "info.json")]
    args = dry_selection(phase.args) if dry else list(phase.args)
    command = [python, "-m", "pytest", *args, "-v", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={work / (phase.name + '.xml')}"]
    return command + (list(BENCH_OPTIONS) if phase.bench else [])


def kill_group(process: subprocess.Popen) -> None:
    """End the phase's process group (its pytest, compile workers, build jobs): TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:     # the leader is gone; children that ignored TERM get KILL
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


class Child:
    """One phase's process, in its own process group, its output appended to the phase's log."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log: Path, title: str, limit_s: float):
        self.title, self.log = title, log
        self.out = log.open("a")
        self.out.write(f"\n==== {title} (limit {limit_s:.0f} s): {' '.join(command)}\n")
        self.out.flush()
        self.offset = self.out.tell()
        self.started = time.monotonic()
        self.process = subprocess.Popen(list(command), cwd=ROOT, env=dict(env), stdout=self.out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)

    def finish(self, limit_s: float | None) -> tuple[str, int | None, float, str]:
        """Wait up to ``limit_s`` seconds, killing the group then; with None, stop it now if it still runs.

        Returns ``(status, exit code or None, seconds, output)``; status ok | failed | timeout | stopped.
        """
        if limit_s is None:
            running = self.process.poll() is None
            if running:
                kill_group(self.process)
            code = None if running else self.process.returncode
            status = "stopped" if running else ("ok" if code == 0 else "failed")
            note = "stopped as planned" if running else f"exit {code}"
        else:
            try:
                code = self.process.wait(timeout=max(limit_s, 0.1))
                status, note = ("ok" if code == 0 else "failed"), f"exit {code}"
            except subprocess.TimeoutExpired:
                kill_group(self.process)
                code, status, note = None, "timeout", f"killed at its {limit_s:.0f} s limit"
        seconds = time.monotonic() - self.started
        self.out.write(f"\n==== {self.title}: {status} ({note}) after {seconds:.1f} s\n")
        self.out.close()
        with self.log.open() as written:
            written.seek(self.offset)
            return status, code, seconds, written.read()


def run_command(command: Sequence[str], env: Mapping[str, str], limit_s: float, log: Path,
                title: str) -> tuple[str, int | None, float, str]:
    """Run ``command`` under ``limit_s`` seconds, output appended to ``log``.

    Returns ``(status, exit code or None, seconds, the output it wrote)``; status ok | failed | timeout.
    """
    return Child(command, env, log, title, limit_s).finish(limit_s)


def phase_env(phase: Phase, work: Path) -> dict[str, str]:
    # A phase is a pytest session of its own: a parent pytest-xdist worker's variables would make
    # pytest-benchmark switch itself off there.
    inherited = {key: value for key, value in os.environ.items()
                 if not key.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    env = dict(inherited, PYTHONUNBUFFERED="1", **phase.env)
    if phase.kind == "pytest":   # benchmark results go to the run's folder, never into bench/results/
        env["CPL_BENCH_RESULTS"] = str(work / phase.name)
    return env


def collect(phase: Phase, dry: bool, work: Path, output: str, code: int | None) -> tuple[str | None, dict]:
    """``(why the phase failed or None, details)`` from the phase's files; the dry rules for pytest phases."""
    details: dict = {}
    problem = None
    if phase.kind in ("build", "info"):
        path = work / f"{phase.kind}.json"
        details[phase.kind] = json.loads(path.read_text()) if path.is_file() else {}
        return problem, details
    outcome = report.pytest_outcome(work / f"{phase.name}.xml", output)
    details["pytest"] = outcome
    if phase.bench:
        details["bench"] = report.bench_outcome(work / phase.name)
    if code == 5:
        problem = "pytest collected no test"
    if dry and code == 0:
        unskipped = outcome["collected"] - outcome["skipped"]
        reasons = outcome["skip_reasons"]
        if outcome["collected"] == 0:
            problem = "no gpu case collected"
        elif unskipped:
            problem = f"{unskipped} gpu case(s) ran instead of skipping on a machine without CUDA"
        elif not all("cuda" in reason.lower() for reason in reasons):
            problem = f"a gpu case skipped without saying it needs CUDA: {next(iter(reasons))!r}"
    return problem, details


def _settle(phase: Phase, entry: dict, child: Child, dry: bool, work: Path, limit_s: float | None) -> None:
    """Wait for (or stop) ``child`` and record its outcome in ``entry``."""
    status, code, seconds, output = child.finish(limit_s)
    problem, details = collect(phase, dry, work, output, code)
    if status == "stopped":       # a background phase stopped as planned: what it did is kept
        status, entry["note"] = "ok", f"stopped before {phase.background_until}, after {seconds:.0f} s"
    if problem and status == "ok":
        status = "failed"
    entry.update(status=status, exit_code=code, seconds=round(seconds, 1), details=details, problem=problem,
                 output_tail=output[-4000:])
    if phase.echo:
        print(output.rstrip(), flush=True)
    why = f" ({problem})" if problem else ""
    print(f"[gpu_check] {phase.name}: {status} after {seconds:.0f} s{why}", flush=True)


def run_phases(phases: Sequence[Phase], out_dir: Path, dry: bool, budget_s: float,
               limit_s: float | None = None, commands: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Run every phase in turn within ``budget_s``; ``limit_s`` replaces every cap (the rehearsal's);
    ``commands`` replaces phases' commands by name (tests of this driver). Returns the run's record.

    A phase with ``background_until`` starts and the run moves on at once; it is stopped, if still running,
    before the phase it names starts (or at the end) and takes none of the budget.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in {phase.log for phase in phases}:
        (out_dir / name).write_text("")
    started, record = time.monotonic(), []
    background: list[tuple[Phase, dict, Child]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        for index, phase in enumerate(phases):
            for item in [b for b in background if b[0].background_until == phase.name]:
                background.remove(item)
                _settle(*item, dry, work, None)
            foreground = [p for p in phases[index + 1:] if not p.background_until]
            left = budget_s - (time.monotonic() - started)
            reserve = sum(later.floor_s for later in foreground) if limit_s is None else 0.0
            cap = phase.limit_s if limit_s is None else limit_s
            allowed = cap if phase.background_until else min(cap, left - reserve)
            entry: dict = {"name": phase.name, "kind": phase.kind, "dry": dry, "cap_s": cap}
            record.append(entry)
            if allowed < max(1.0, 0.5 * phase.floor_s):
                entry.update(status="skipped", seconds=0.0, limit_s=None,
                             reason=f"no time left ({left:.0f} s of the budget, {reserve:.0f} s kept for "
                                    "later phases)")
                print(f"[gpu_check] {phase.name}: skipped, {entry['reason']}", flush=True)
                continue
            command = (list(commands[phase.name]) if commands and phase.name in commands
                       else command_for(phase, dry, work))
            entry.update(command=command, limit_s=round(allowed, 1))
            mode = f"in the background until {phase.background_until}" if phase.background_until else "run"
            print(f"[gpu_check] {phase.name}: {mode}, limit {allowed:.0f} s", flush=True)
            child = Child(command, phase_env(phase, work), out_dir / phase.log, phase.name, allowed)
            if phase.background_until:
                background.append((phase, entry, child))
                continue
            _settle(phase, entry, child, dry, work, allowed)
        for item in background:
            _settle(*item, dry, work, None)
    return {"dry_run": dry, "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": f"{platform.node()}, {platform.platform()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}",
            "budget_s": budget_s, "total_s": time.monotonic() - started, "phases": record}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU validation in one call (see scripts/gpu_check.py).")
    parser.add_argument("output", nargs="?", default="gpu_results", type=Path,
                        help="folder for the results and logs (default gpu_results/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU rehearsal: wiring, collection, skip reasons")
    parser.add_argument("--budget-s", type=float, help=f"whole-run budget (default {BUDGET_S:.0f} s, dry "
                                                       f"{DRY_BUDGET_S:.0f} s)")
    args = parser.parse_args(argv)
    out_dir = args.output if args.output.is_absolute() else Path.cwd() / args.output
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    run = run_phases(PHASES, out_dir, args.dry_run, budget, limit_s=DRY_LIMIT_S if args.dry_run else None)
    report.write_json(out_dir / "gpu_check.json", run)
    report.write_markdown(out_dir / "gpu_check.md", run)
    ok = all(phase["status"] == "ok" for phase in run["phases"])
    mode = "CPU rehearsal" if args.dry_run else "GPU check"
    print(f"\n{mode}: {sum(p['status'] == 'ok' for p in run['phases'])} of {len(run['phases'])} phases ok "
          f"in {run['total_s']:.0f} s; results in {out_dir}")
    print("\n".join(report.table_lines(run)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

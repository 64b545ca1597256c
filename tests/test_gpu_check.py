"""The GPU check (scripts/gpu_check.sh) rehearsed on the CPU, and its driver's limits and reports.

``--dry-run`` runs every phase of the real check with a small limit: the toolchain checks of the build,
``cpl-info``, and each pytest phase's own selection restricted to its ``gpu`` cases, which must be
collected and skip with a reason that names CUDA. The other tests drive scripts/gpu_check.py's phase
runner directly: a phase past its limit is killed with its children and the next phase still runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))    # scripts/ is no package: the driver and its report module
import gpu_check  # noqa: E402
import gpu_check_report as report  # noqa: E402


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_results")
    env = dict(os.environ, PYTHON=sys.executable)
    started = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    return done, out, time.monotonic() - started


def test_rehearsal_passes_every_phase(rehearsal):
    done, out, seconds = rehearsal
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    run = json.loads((out / "gpu_check.json").read_text())
    assert run["dry_run"] is True
    assert [p["name"] for p in run["phases"]] == [p.name for p in gpu_check.PHASES]
    for phase in run["phases"]:
        assert phase["status"] == "ok", (phase["name"], phase.get("problem"),
                                         phase.get("output_tail", "")[-2000:])
        assert phase["limit_s"] <= gpu_check.DRY_LIMIT_S
    assert seconds < 240, f"the rehearsal took {seconds:.0f} s"


def test_rehearsal_collects_the_gpu_cases_and_they_skip_saying_why(rehearsal):
    _, out, _ = rehearsal
    run = json.loads((out / "gpu_check.json").read_text())
    pytest_phases = [p for p in run["phases"] if p["kind"] == "pytest"]
    assert {p["name"] for p in pytest_phases} >= {"tests", "bench_prompt_mix", "bench_cpr_distances",
                                                  "bench_cpr_step"}
    for phase in pytest_phases:
        outcome = phase["details"]["pytest"]
        assert outcome["collected"] > 0 and outcome["skipped"] == outcome["collected"], phase["name"]
        assert all("cuda" in reason.lower() for reason in outcome["skip_reasons"]), outcome["skip_reasons"]
    by_name = {p["name"]: p["details"]["pytest"] for p in pytest_phases}
    assert by_name["tests"]["collected"] >= 100                       # the whole GPU suite, not a stub
    assert by_name["bench_cpr_step"]["collected"] == 4                # loop, fast_fused x fp32, bf16


def test_rehearsal_writes_its_files_and_ends_with_the_table(rehearsal):
    done, out, _ = rehearsal
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUTPUT_FILES) and len(files) <= 8
    last = done.stdout.strip().splitlines()[-(len(gpu_check.PHASES) + 1):]
    assert last[0].split()[:3] == ["phase", "status", "time"]
    assert [line.split()[0] for line in last[1:]] == [p.name for p in gpu_check.PHASES]
    assert all(line.split()[1] == "ok" for line in last[1:])
    assert "# GPU check: CPU rehearsal" in (out / "gpu_check.md").read_text()
    assert "==== tests (limit" in (out / "tests.log").read_text()


def _phase(name: str, floor_s: float = 0.0) -> gpu_check.Phase:
    return gpu_check.Phase(name, "info", "build.log", limit_s=30, floor_s=floor_s)


def test_a_phase_past_its_limit_is_killed_with_its_children_and_the_next_runs(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    hang = (f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)")
    commands = {"hangs": [sys.executable, "-c", hang],
                "fails": [sys.executable, "-c", "import sys; sys.exit(3)"],
                "works": [sys.executable, "-c", "print('done')"]}
    phases = [_phase("hangs"), _phase("fails"), _phase("works")]
    started = time.monotonic()
    run = gpu_check.run_phases(phases, tmp_path / "out", dry=True, budget_s=60, limit_s=3, commands=commands)
    assert time.monotonic() - started < 30
    hangs, fails, works = run["phases"]
    assert hangs["status"] == "timeout" and hangs["exit_code"] is None and hangs["seconds"] < 15
    assert fails["status"] == "failed" and fails["exit_code"] == 3
    assert works["status"] == "ok" and "done" in works["output_tail"]
    grandchild = int(pid_file.read_text())
    for _ in range(50):       # the whole process group was killed, the grandchild with it
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild}, started by the timed-out phase, is still running")
    assert "killed at its 3 s limit" in (tmp_path / "out" / "build.log").read_text()


def test_the_budget_keeps_later_floors_and_skips_what_no_longer_fits(tmp_path):
    commands = {"first": [sys.executable, "-c", "import time; time.sleep(60)"],
                "second": [sys.executable, "-c", "print('second ran')"]}
    # "first" may use the budget less the floor kept for "second", which then still runs.
    run = gpu_check.run_phases([_phase("first"), _phase("second", floor_s=4)], tmp_path, dry=False,
                               budget_s=6, commands=commands)
    first, second = run["phases"]
    assert first["status"] == "timeout" and first["limit_s"] == pytest.approx(2, abs=0.5)
    assert second["status"] == "ok" and "second ran" in second["output_tail"]
    # With no floor kept, a phase that uses up the budget leaves none for the next, which is skipped.
    run = gpu_check.run_phases([_phase("first"), _phase("second")], tmp_path, dry=False, budget_s=2.5,
                               commands=commands)
    first, second = run["phases"]
    assert first["status"] == "timeout"
    assert second["status"] == "skipped" and "no time left" in second["reason"]


def test_a_background_phase_is_stopped_before_the_phase_it_names(tmp_path):
    commands = {"beside": [sys.executable, "-c", "import time; print('warming', flush=True); time.sleep(60)"],
                "first": [sys.executable, "-c", "import time; time.sleep(1)"],
                "second": [sys.executable, "-c", "print('second ran')"]}
    phases = [gpu_check.Phase("beside", "info", "prewarm.log", 600, background_until="second"),
              _phase("first"), _phase("second")]
    started = time.monotonic()
    run = gpu_check.run_phases(phases, tmp_path, dry=False, budget_s=30, commands=commands)
    assert time.monotonic() - started < 20
    beside, first, second = run["phases"]
    assert first["status"] == "ok" and second["status"] == "ok"
    assert beside["status"] == "ok" and beside["exit_code"] is None
    assert "stopped before second" in beside["note"]
    assert 1 <= beside["seconds"] < 15 and "warming" in beside["output_tail"]
    assert report.result_line(beside).startswith("stopped before second")


def test_real_mode_collects_benchmark_results(tmp_path):
    """A real-mode benchmark phase on the CPU (the smallest cpr_distances case): its numbers get reported."""
    selection = ("bench/test_cpr_distances.py", "-k", "relu5_1 and (reference or cpu)")
    phase = gpu_check.Phase("bench_cpr_distances", "pytest", "bench.log", 300, 0, selection, bench=True)
    run = gpu_check.run_phases([phase], tmp_path, dry=False, budget_s=300)
    entry = run["phases"][0]
    assert entry["status"] == "ok", entry.get("output_tail", "")[-3000:]
    assert entry["details"]["pytest"]["passed"] == 2
    records = entry["details"]["bench"]["cpr_distances"]["benchmarks"]
    assert {r["extra_info"]["provider"] for r in records} == {"reference", "cpu"}
    assert all(0 < r["extra_info"]["of_copy_bandwidth"] for r in records)
    line = report.result_line(entry)
    assert line.startswith("2 passed, 0 failed, 0 skipped")
    assert "cpu: " in line and "of copy bandwidth" in line


def test_cpr_step_result_line():
    def record(case, provider, ms, flops_rate=None):
        info = {"case": case, "provider": provider, "median_s": ms / 1e3}
        if flops_rate:
            info.update(achieved_flops_per_s=flops_rate, matmul_fp32_flops_per_s=50e12,
                        matmul_bf16_flops_per_s=800e12)
        return {"extra_info": info}

    line = report.cpr_step_line([record("cpl-128-b4", "loop", 300),
                                 record("cpl-128-b4", "fast_fused", 200, 10e12),
                                 record("cpl-128-b4-bf16", "fast_fused", 100, 80e12)])
    assert ("cpl-128-b4: loop 300 ms, fast_fused 200 ms, fast/loop 1.50x, "
            "fast_fused 10.0 TFLOP/s = 20% of fp32 matmul") in line
    assert "cpl-128-b4-bf16: fast_fused 100 ms, fast_fused 80.0 TFLOP/s = 10% of bf16 matmul" in line


def test_dry_selection_keeps_paths_and_k_and_selects_gpu_cases():
    assert gpu_check.dry_selection(["bench/x.py", "-m", "gpu", "-k", "a and not b"]) == [
        "bench/x.py", "-k", "a and not b", "-m", "gpu"]
    assert gpu_check.dry_selection(["bench/x.py"]) == ["bench/x.py", "-m", "gpu"]


def test_real_phase_limits_fit_the_budget():
    """The floors kept for the phases fit the budget, and the budget leaves room inside 9 minutes."""
    assert sum(p.floor_s for p in gpu_check.PHASES) < gpu_check.BUDGET_S <= 9 * 60 - 15
    assert all(p.floor_s <= p.limit_s for p in gpu_check.PHASES)
    assert len({p.log for p in gpu_check.PHASES}) + 2 == len(gpu_check.OUTPUT_FILES) <= 8

"""Kill a training run with SIGKILL after a checkpoint, resume it, and get the uninterrupted run's weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpl_fast.runs.checkpoints import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 12
EVERY = 4
# CPR objective with the other_task sampler (its routing memory is state too), EMA on, an epoch of 5
# batches so the run crosses epoch boundaries and is killed mid-epoch.
SETTINGS = ["objective=loop", "cpr.negative_sampler=other_task", "cpr.m=2", "ema.enabled=true", "ema.decay=0.9",
            "data.crop=32", "data.batch=4", "data.samples_per_epoch=20", f"train.iterations={TOTAL}",
            f"checkpoint.every={EVERY}", "checkpoint.keep=2", "logging.progress=false", "train.log_every=1",
            "eval.before_after=false", "report.enabled=false", "baselines={}", "threads=1",
            "data.num_workers=0"]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cpl_fast.cli.train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(run_dir: Path) -> subprocess.Popen:
    sets = [item for s in SETTINGS for item in ("--set", s)]
    return subprocess.Popen(_command("--preset", "demo", "--run-dir", str(run_dir), *sets), cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_run_resumes_bit_for_bit(tmp_path):
    reference = _train(tmp_path / "uninterrupted")
    killed = _train(tmp_path / "killed")
    seen_checkpoint, lines = False, []
    for line in killed.stdout:
        lines.append(line)
        if f"checkpoints/step_{EVERY:08d}" in line:
            seen_checkpoint = True
        elif seen_checkpoint and line.startswith(f"step {EVERY + 1}/{TOTAL}"):
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "".join(lines)
    stopped_at = int(latest_checkpoint(tmp_path / "killed").name.split("_")[1])
    assert EVERY <= stopped_at < TOTAL

    resumed = subprocess.run(_command("--resume", str(tmp_path / "killed")), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed {tmp_path / 'killed'} at step {stopped_at}" in resumed.stdout
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    final_a = latest_checkpoint(tmp_path / "killed")
    final_b = latest_checkpoint(tmp_path / "uninterrupted")
    assert final_a.name == final_b.name == f"step_{TOTAL:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(final_a / name), load_file(final_b / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming"
    state_a = torch.load(final_a / "trainer_state.pt", weights_only=False)
    state_b = torch.load(final_b / "trainer_state.pt", weights_only=False)
    losses_a = [h["loss"] for h in state_a["history"]]
    assert losses_a == [h["loss"] for h in state_b["history"]] and len(losses_a) == TOTAL


@pytest.mark.parametrize("keep", [2])
def test_old_checkpoints_are_pruned(tmp_path, keep):
    """Only the newest ``checkpoint.keep`` checkpoints stay (the finished uninterrupted run of the test above
    is not shared, so this runs a short one)."""
    extra = ["objective=l1", "train.iterations=6", "checkpoint.every=2"]
    sets = [item for s in SETTINGS + extra for item in ("--set", s)]
    done = subprocess.run(_command("--preset", "demo", "--run-dir", str(tmp_path), *sets), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"]

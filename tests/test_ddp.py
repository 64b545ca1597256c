"""DDP on the CPU (gloo): two processes with batch b train exactly like one process with batch 2b.

Each rank's loss is a mean over its b samples and DDP averages the gradients, so the update is the
one of the mean over 2b samples; the data sampler shards one stream and the negatives are drawn for
the global batch, so the samples and negatives are the same too. float64 makes the comparison tight.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpl_fast.models import build_model
from cpl_fast.runs.checkpoints import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["precision=float64", "data.crop=32", "train.iterations=3", "checkpoint.every=100",
            "logging.progress=false", "eval.before_after=false", "report.enabled=false", "baselines={}",
            "threads=1", "data.num_workers=0", "optim.lr=1e-3"]


def _start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(process: subprocess.Popen) -> None:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-8000:]


def _args(run_dir: Path, objective: str, batch: int) -> list[str]:
    sets = SETTINGS + [f"objective={objective}", f"data.batch={batch}"]
    return ["-m", "cpl_fast.cli.train", "--preset", "demo", "--run-dir", str(run_dir),
            *[item for s in sets for item in ("--set", s)]]


@pytest.mark.parametrize("objective", ["l1", "loop", "fast"])
def test_two_gloo_processes_equal_one_with_the_doubled_batch(tmp_path, objective):
    # Both jobs at once: most of their time is start-up.
    ddp_job = _start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      *_args(tmp_path / "ddp", objective, batch=2)])
    single_job = _start([sys.executable, *_args(tmp_path / "single", objective, batch=4)])
    _finish(ddp_job)
    _finish(single_job)
    ddp = load_file(latest_checkpoint(tmp_path / "ddp") / "model.safetensors")
    single = load_file(latest_checkpoint(tmp_path / "single") / "model.safetensors")
    assert ddp.keys() == single.keys()
    for key in single:
        assert single[key].dtype == torch.float64
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-10, msg=key)
    # The comparison means something: training moved the weights far beyond the tolerance (the trainer
    # seeds torch with the config's seed, 0, right before building the model).
    torch.manual_seed(0)
    init = build_model("tiny", route_bias="prompt1.route_bias" in single).double().state_dict()
    assert max(float((single[key] - init[key]).abs().max()) for key in single) > 1e-4

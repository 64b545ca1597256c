"""Small-scale reproduction of the paper's SPM / CPR ablations (Tables VII and XII), end to end. Slow.

Trains the four variants of ``cpl_fast/configs/repro.yaml`` (dense PromptIR, SPM k=1, SPM k=1 + CPR,
SPM k=2 + CPR; same data, crops, batches, steps and seed) on the embedded three-task set, then scores
them with ``cpl-eval`` (protocol ``promptir``, with the degraded inputs as a reference row) and
analyses their routing with ``cpl-analyze``. About 50 minutes on one thread of a 2-core CPU.

    pytest bench/test_reproduction.py -m slow -s
    CPL_REPRO_OUT=bench/results CPL_REPRO_STEPS=900 pytest bench/test_reproduction.py -m slow -s

``CPL_REPRO_OUT``: where the run folder, tables and figures go (default: a temporary folder);
``CPL_REPRO_STEPS``: optimiser steps per run (default: the config's). The committed results and the
exact commands they came from are in ``bench/results/repro_ablation.md``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cpl_fast.cli.analyze import main as analyze_main
from cpl_fast.cli.eval import eval_main
from cpl_fast.cli.train import main as train_main

CONFIG = Path(__file__).resolve().parents[1] / "cpl_fast" / "configs" / "repro.yaml"
VARIANTS = ("dense", "spm_k1", "", "spm_k2_cpr")  # "" is the main run: SPM k=1 + CPR
NAMES = ("dense", "spm_k1", "spm_k1_cpr", "spm_k2_cpr")


@pytest.mark.slow
def test_reproduction(tmp_path):
    out = Path(os.environ.get("CPL_REPRO_OUT", tmp_path))
    run_dir = out / "repro_run"
    argv = ["--config", str(CONFIG), "--run-dir", str(run_dir)]
    if os.environ.get("CPL_REPRO_STEPS"):
        argv += ["--set", f"train.iterations={int(os.environ['CPL_REPRO_STEPS'])}"]
    assert train_main(argv) == 0
    results = [json.loads((run_dir / v / "result.json").read_text()) for v in VARIANTS]
    assert len({r["steps"] for r in results}) == 1, "every variant must train the same number of steps"

    ckpts = [a for v, n in zip(VARIANTS, NAMES) for a in ("--ckpt", str(run_dir / v), "--name", n)]
    scores = out / "repro_scores.json"
    assert eval_main([*ckpts, "--protocol", "promptir", "--input-baseline", "--entropy", "--no-progress",
                      "--json", str(scores), "--markdown", str(out / "repro_scores.md")]) == 0
    assert analyze_main([*ckpts, "-o", str(out / "repro_analysis"), "--no-progress"]) == 0
    runs = json.loads(scores.read_text())["runs"]
    assert set(runs) == {"input (no restoration)", *NAMES}
    for name in NAMES:
        assert (out / "repro_analysis" / name / "selection_map.png").is_file()

"""cpl-train as a day-to-day tool: extending a finished run, validation during training with the best
checkpoint kept, the text log, the effective config, optional loggers checked before anything is made."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpl_fast.cli.train import main
from cpl_fast.config import load_config
from cpl_fast.data import EMBEDDED_TASKS
from cpl_fast.train.schedule import WarmupCosine, warmup_iterations
from tests.tiny_runs import TINY_RUN, as_sets

ROOT = Path(__file__).resolve().parents[1]


def _settings(*extra: str) -> list[str]:
    return as_sets([s for s in TINY_RUN if not s.startswith("checkpoint.every")] + list(extra))


def test_resume_with_more_iterations_trains_the_extra_steps(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["--preset", "demo", "--run-dir", str(run), *_settings("checkpoint.every=1")]) == 0
    first = json.loads((run / "result.json").read_text())
    assert first["steps"] == 2
    capsys.readouterr()

    assert main(["--resume", str(run), "--set", "train.iterations=5"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 5 and [h["step"] for h in result["history"]] == [1, 2, 3, 4, 5]
    assert "the run was 2 steps long and is now 5" in out
    # The schedule over the new length, from step 2 on (the learning rate each step trained with).
    cfg = load_config("demo", [], ["train.iterations=5"])
    factor = WarmupCosine(warmup_iterations(cfg["schedule"]["warmup_epochs"],
                                            cfg["schedule"]["schedule_epochs"], 5), 5)
    for entry in result["history"][2:]:
        assert math.isclose(entry["lr"], cfg["optim"]["lr"] * factor(int(entry["step"]) - 1), rel_tol=1e-9)
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["iterations"] == 5  # its new length

    # Nothing more to do: said, not silent.
    assert main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "finished at step 5 of 5: nothing to train" in out and "train.iterations" in out


def test_validation_every_n_steps_keeps_the_best(tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["--preset", "demo", "--run-dir", str(run),
                 *_settings("train.iterations=4", "checkpoint.every=10", "eval.every=2",
                            "eval.images_per_task=1", "checkpoint.keep_best=true", "logging.tensorboard=true",
                            "eval.sample_images=2")]) == 0
    result = json.loads((run / "result.json").read_text())
    assert [v["step"] for v in result["validations"]] == [2, 4]
    best = max(result["validations"], key=lambda v: v["psnr"])
    saved = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    assert saved["step"] == best["step"] and math.isclose(saved["psnr"], best["psnr"])
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    tasks = {key[len("psnr_"):] for key in best if key.startswith("psnr_")}
    assert tasks == set(EMBEDDED_TASKS)  # every test task, one image each

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"eval/psnr", "eval/ssim", "eval/selection_entropy_l0", "train/loss", "train/lr"} \
        <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/psnr")] == [2, 4]
    assert len(events.Tags()["images"]) == 2


def test_keep_best_needs_validation(tmp_path, capsys):
    assert main(["--preset", "demo", "--run-dir", str(tmp_path / "r"),
                 *_settings("checkpoint.keep_best=true")]) == 2
    assert "eval.every" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_redirected_output_gets_log_lines_and_train_log(tmp_path):
    """Output to a pipe (not a terminal): no carriage-return bar, a plain line every log_every steps;
    the same lines in RUN/train.log."""
    run = tmp_path / "run"
    settings = [s for s in TINY_RUN if not s.startswith(("logging.progress", "train.iterations"))]
    settings += ["logging.progress=true", "train.iterations=4", "train.log_every=2"]
    proc = subprocess.run([sys.executable, "-m", "cpl_fast.cli.train", "--preset", "demo",
                           "--run-dir", str(run), *as_sets(settings)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/4", "4/4"]
    assert all(" lr " in line for line in steps)
    log = (run / "train.log").read_text()
    assert "step 2/4 loss" in log and "step 4/4 loss" in log and "checkpoint " in log


def test_print_config_prints_the_effective_config_and_creates_nothing(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main(["--print-config", "--preset", "demo", "--set", "optim.lr=1e-3",
                 "--set", "eval.every=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config("demo", [], ["optim.lr=1e-3", "eval.every=7"])
    assert list(tmp_path.iterdir()) == []


def test_missing_wandb_is_refused_before_the_run_folder_exists(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    root = tmp_path / "runs"
    code = main(["--preset", "demo", "--set", f"run.root={root}", *_settings("logging.wandb=true")])
    assert code == 2
    assert "logging.wandb=true but wandb is not installed" in capsys.readouterr().err
    assert not root.exists()


@pytest.mark.parametrize("module,function", [
    ("cpl_fast.cli.train", "main"), ("cpl_fast.cli.eval", "eval_main"), ("cpl_fast.cli.restore", "main"),
    ("cpl_fast.cli.analyze", "main"), ("cpl_fast.cli.export", "main"), ("cpl_fast.cli.data", "main"),
    ("cpl_fast.cli.info", "main"), ("cpl_fast.cli.convert", "main"),
])
def test_help_does_not_import_torch(module, function):
    """``--help`` answers at once: torch (seconds to import) is imported after the arguments are parsed."""
    code = (f"import sys\nfrom {module} import {function}\ntry:\n    {function}(['--help'])\n"
            f"except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            f"print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO TORCH")


def test_run_folders_from_before_a_setting_existed_still_resume(tmp_path, capsys, one_thread):
    """A run's config.yaml written before eval.every / checkpoint.keep_best existed."""
    import yaml

    run = tmp_path / "run"
    assert main(["--preset", "demo", "--run-dir", str(run), *_settings("checkpoint.every=1")]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["eval"]["every"], config["checkpoint"]["keep_best"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["--resume", str(run), "--set", "train.iterations=3"]) == 0
    from cpl_fast.runs.loading import load_model

    assert load_model(run).model is not None


def test_report_scores_the_inputs_for_the_psnr_figure(tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["--preset", "demo", "--run-dir", str(run),
                 *_settings("eval.before_after=true", "eval.max_images=2", "report.enabled=true")]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["inputs"] and set(result["inputs"]) == set(result["after"])
    assert all(math.isfinite(s["psnr"]) for s in result["inputs"].values())
    assert (run / "psnr_per_task.png").is_file() and (run / "report.md").is_file()

"""Run folders: unique names, one writer at a time (real concurrent processes), no silent overwrite."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import TINY_RUN, as_sets

from cpl_fast.cli.train import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cpl_fast.cli.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    """Both at once, with the same name and root: two folders, two complete runs."""
    settings = [*TINY_RUN, f"run.root={tmp_path / 'runs'}", "name=same"]
    jobs = [_start("--preset", "demo", *as_sets(settings)) for _ in range(2)]
    outs = [job.communicate(timeout=300) for job in jobs]
    for job, (out, err) in zip(jobs, outs):
        assert job.returncode == 0, out + err
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2, folders
    for folder in folders:
        assert (folder / "config.yaml").is_file() and (folder / "result.json").is_file()
        assert (folder / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    printed = sorted(line.split(": ", 1)[1] for out, _ in outs for line in out.splitlines()
                     if line.startswith("run folder: "))
    assert printed == [str(f) for f in folders]


def test_a_default_name_taken_in_the_same_second_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20260101-120000")
    settings = [*TINY_RUN, f"run.root={tmp_path}", "name=same", "train.iterations=1"]
    assert main(["--preset", "demo", *as_sets(settings)]) == 0
    assert main(["--preset", "demo", *as_sets(settings)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same-20260101-120000", "same-20260101-120000-2"]


def test_a_second_writer_is_refused_while_a_run_holds_the_folder(tmp_path):
    run = tmp_path / "run"
    first = _start("--preset", "demo", "--run-dir", str(run),
                   *as_sets([*TINY_RUN, "train.iterations=100000", "checkpoint.every=100000", "seed=1"]))
    try:
        line = first.stdout.readline()
        assert line.startswith("run folder: "), line + first.stderr.read()
        fresh = ["--preset", "demo", "--run-dir", str(run), *as_sets([*TINY_RUN, "seed=2"])]
        for args in (fresh, [*fresh, "--overwrite"], ["--resume", str(run)]):
            second = _start(*args)
            _, err = second.communicate(timeout=300)
            assert second.returncode == 2, err
            assert f"is in use by process {first.pid}" in err and "Traceback" not in err
            assert first.poll() is None, "the first run stopped"
        assert "seed: 1" in (run / "config.yaml").read_text()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)


def test_a_fresh_run_refuses_a_folder_that_holds_a_run_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--preset", "demo", "--run-dir", str(run), *as_sets([*TINY_RUN, "train.iterations=3"])]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["--preset", "demo", "--run-dir", str(run), *as_sets(TINY_RUN)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert _snapshot(run) == before  # untouched
    assert main(["--preset", "demo", "--run-dir", str(run), "--overwrite", *as_sets(TINY_RUN)]) == 0
    # Nothing of the old run is mixed in: its step 3 is gone, the config and result are the new run's.
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert "iterations: 2" in (run / "config.yaml").read_text()
    assert '"steps": 2' in (run / "result.json").read_text()


def test_an_empty_existing_folder_is_a_fine_run_folder(tmp_path):
    (tmp_path / "run").mkdir()
    settings = [*TINY_RUN, "train.iterations=1"]
    assert main(["--preset", "demo", "--run-dir", str(tmp_path / "run"), *as_sets(settings)]) == 0


@pytest.mark.parametrize("setting", ["name=../../escaped", "name=/abs", "name=a/b",
                                     "baselines={'../up': {objective: l1}}"])
def test_names_cannot_leave_the_run_root(tmp_path, capsys, monkeypatch, setting):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root").mkdir()
    code = main(["--preset", "demo", *as_sets([*TINY_RUN, "run.root=root/runs", setting])])
    assert code == 2
    assert "must be a plain folder name" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["root"]

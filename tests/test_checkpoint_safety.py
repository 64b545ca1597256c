"""Checkpoints that are hostile, half-replaced, missing or corrupt: refused by name, or skipped for the
newest complete one with a warning; never executed, never a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY_RUN, as_sets

from cpl_fast.cli.train import main
from cpl_fast.models import build_model
from cpl_fast.runs import checkpoints as checkpointing
from cpl_fast.runs.checkpoints import CheckpointError, latest_checkpoint, read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A two-step tiny run with checkpoints at steps 1 and 2 (copy it before changing it)."""
    run = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["--preset", "demo", "--run-dir", str(run), *as_sets(TINY_RUN)]) == 0
    return run


@pytest.fixture()
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    (copy / "result.json").unlink()  # so --resume loads the checkpoint instead of the stored result
    return copy


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and record its new size, as someone editing a run folder would."""
    (folder / name).write_bytes(data)
    info = json.loads((folder / "state.json").read_text())
    if "sizes" in info:
        info["sizes"][name] = len(data)
    (folder / "state.json").write_text(json.dumps(info))


class _MakesFolder:
    """A pickle payload: unpickling it calls ``os.mkdir(path)``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


# ------------------------------------------------------------------------------- hostile files

def test_resume_refuses_a_planted_payload_without_running_it(run, tmp_path):
    marker = tmp_path / "payload-ran"
    for folder in (run / "checkpoints").glob("step_*"):
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        state["optimizer"] = _MakesFolder(marker)
        path = tmp_path / "hostile.pt"
        torch.save(state, path)
        _rewrite(folder, "trainer_state.pt", path.read_bytes())
    done = subprocess.run([sys.executable, "-m", "cpl_fast.cli.train", "--resume", str(run)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the planted payload ran"
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing to load" in done.stderr and "posix.mkdir" in done.stderr
    assert "Traceback" not in done.stderr


def test_load_trainer_state_reads_numpy_rng_states_and_refuses_other_objects(tmp_path):
    import random

    import numpy as np

    from cpl_fast.runs.checkpoints import UnsafeCheckpointError, load_trainer_state

    state = {"numpy": np.random.get_state(), "python": random.getstate(), "t": torch.arange(3)}
    torch.save(state, tmp_path / "ok.pt")
    back = load_trainer_state(tmp_path / "ok.pt")
    np.random.set_state(back["numpy"])
    random.setstate(back["python"])
    assert torch.equal(back["t"], torch.arange(3))
    torch.save({"x": _MakesFolder(tmp_path / "ran")}, tmp_path / "bad.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*bad\.pt.*posix\.mkdir"):
        load_trainer_state(tmp_path / "bad.pt")
    assert not (tmp_path / "ran").exists()
    (tmp_path / "junk.pt").write_bytes(b"junk" * 100)
    with pytest.raises(CheckpointError, match=r"junk\.pt is corrupt") as caught:
        load_trainer_state(tmp_path / "junk.pt")
    assert not isinstance(caught.value, UnsafeCheckpointError)


# ------------------------------------------------------------------------ replacing a checkpoint

class Killed(BaseException):
    """Stands for SIGKILL at one file-system operation."""


def _state(version: int) -> dict:
    return {"version": torch.tensor([version])}


def _version(folder: Path) -> int:
    return int(torch.load(folder / "trainer_state.pt", weights_only=True)["version"])


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_saving_an_existing_step_again_never_leaves_latest_without_a_checkpoint(tmp_path, monkeypatch,
                                                                              exchange):
    """Resuming a finished run without result.json saves its last step again: a kill at any file-system
    operation of that save leaves ``latest`` on a complete step 2, old or new."""
    model = build_model("tiny")
    save_checkpoint(tmp_path / "pristine", 1, model, _state(1), {})
    save_checkpoint(tmp_path / "pristine", 2, model, _state(2), {})
    if not exchange:
        monkeypatch.setattr(checkpointing, "_exchange", lambda a, b: False, raising=False)
    real = {"replace": os.replace, "rename": os.rename, "rmtree": shutil.rmtree,
            "exchange": getattr(checkpointing, "_exchange", None)}
    crashed_somewhere, crash_at = False, 0
    while True:
        crash_at += 1
        run = tmp_path / f"crash{crash_at}"
        shutil.copytree(tmp_path / "pristine", run)
        count = [0]

        def counted(fn, count=count, crash_at=crash_at):
            def wrapper(*args, **kwargs):
                count[0] += 1
                if count[0] == crash_at:
                    raise Killed
                return fn(*args, **kwargs)
            return wrapper

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", counted(real["replace"]))
            patch.setattr(os, "rename", counted(real["rename"]))
            patch.setattr(shutil, "rmtree", counted(real["rmtree"]))
            if real["exchange"] is not None:
                patch.setattr(checkpointing, "_exchange", counted(real["exchange"]))
            try:
                save_checkpoint(run, 2, model, _state(3), {})
                finished = True
            except Killed:
                finished, crashed_somewhere = False, True

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # falling back to step 1 (a warning) fails too
            folder = latest_checkpoint(run)
        assert json.loads((folder / "state.json").read_text())["step"] == 2
        assert _version(folder) in (2, 3)
        save_checkpoint(run, 2, model, _state(4), {})  # and the next save repairs everything
        assert _version(latest_checkpoint(run)) == 4
        assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        if finished:
            break
    assert crashed_somewhere and crash_at > 3


# --------------------------------------------------------------------- missing, corrupt: fall back

def test_latest_is_never_followed_outside_the_run_folder(run, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(run / "checkpoints" / "step_00000002", outside)
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    with pytest.warns(UserWarning, match="not a step_N checkpoint of this run folder"):
        folder = latest_checkpoint(run)
    assert folder == run / "checkpoints" / "step_00000002"


@pytest.mark.parametrize("damage", ["truncated model", "garbled state.json", "missing folder",
                                    "trainer state not a zip"])
def test_resume_falls_back_to_the_newest_complete_checkpoint(run, capsys, damage):
    newest = run / "checkpoints" / "step_00000002"
    if damage == "truncated model":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbled state.json":
        (newest / "state.json").write_bytes(b"\xff{not json")
    elif damage == "missing folder":
        shutil.rmtree(newest)
    else:
        _rewrite(newest, "trainer_state.pt", b"x" * 64)
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        code = main(["--resume", str(run)])
    out = capsys.readouterr()
    assert code == 0, out.err
    said = [str(w.message) for w in recorded] + out.out.splitlines()  # a warning, or the trainer's log
    assert any("step_00000001, the newest complete checkpoint" in line for line in said), said
    assert f"resumed {run} at step 1" in out.out
    assert latest_checkpoint(run).name == "step_00000002"  # trained again from step 1, saved whole


def test_no_complete_checkpoint_is_one_error_line(run, capsys):
    for folder in (run / "checkpoints").glob("step_*"):
        (folder / "state.json").write_text("{")
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has no complete checkpoint" in err and "state.json is corrupt" in err
    assert "Traceback" not in err


def test_load_newest_checkpoint_skips_a_trainer_state_that_fails_to_read(run):
    """Damage that only reading finds (a valid archive holding the wrong thing): the older one is used."""
    from cpl_fast.runs.checkpoints import load_newest_checkpoint
    newest = run / "checkpoints" / "step_00000002"
    torch.save([1, 2, 3], newest / "list.pt")
    _rewrite(newest, "trainer_state.pt", (newest / "list.pt").read_bytes())
    warned = []
    folder, info, state = load_newest_checkpoint(run, build_model("tiny", route_bias=True),
                                                 warn=warned.append)
    assert folder.name == "step_00000001" and info["step"] == 1 and "optimizer" in state
    assert "holds a list, not a trainer state" in warned[0]
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(newest, build_model("tiny", route_bias=True))


def test_restore_uses_the_newest_complete_checkpoint_of_a_run(run, tmp_path, capsys):
    from cpl_fast.cli.restore import main as restore_main
    from cpl_fast.data import write_png

    newest = run / "checkpoints" / "step_00000002"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[:-10])
    write_png(tmp_path / "in" / "a.png", torch.rand(3, 16, 16))
    with pytest.warns(UserWarning, match="step_00000001"):
        code = restore_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--ckpt", str(run)])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "a.png").is_file()


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tmp_path):
    from cpl_fast.runs.checkpoints import NonFiniteWeightsError
    model = build_model("tiny")
    save_checkpoint(tmp_path, 1, model, _state(1), {})
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="not finite.*not saved as a checkpoint"):
        save_checkpoint(tmp_path, 2, model, _state(2), {})
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]

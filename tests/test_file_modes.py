"""Files and folders the package writes get the mode the umask gives (as ``open``/``mkdir`` would),
not the 0600/0700 of the temporary files they are renamed from."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from cpl_fast.atomic_files import atomic_write_bytes, umask_mode
from cpl_fast.data.io import write_png
from cpl_fast.models import build_model, save_model_state
from cpl_fast.runs.checkpoints import save_checkpoint


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_mode(umask):
    assert umask_mode() == 0o666 & ~umask
    assert umask_mode(folder=True) == 0o777 & ~umask


def test_atomic_bytes_and_png(tmp_path, umask):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    rng = np.random.default_rng(0)
    write_png(tmp_path / "b.png", rng.random((5, 7, 3), dtype=np.float32))
    for name in ("a.json", "b.png"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]  # no temporary left


def test_model_file_and_checkpoint_folder(tmp_path, umask):
    torch.manual_seed(0)
    model = build_model("tiny")
    save_model_state(model, tmp_path / "m.safetensors")
    assert _mode(tmp_path / "m.safetensors") == 0o666 & ~umask
    folder = save_checkpoint(tmp_path / "run", 3, model, {"x": torch.ones(2)}, {"step": 3})
    assert _mode(folder) == 0o777 & ~umask
    for path in folder.rglob("*"):
        assert _mode(path) == (0o777 if path.is_dir() else 0o666) & ~umask, path
    assert _mode(tmp_path / "run" / "checkpoints" / "latest") == 0o666 & ~umask

"""Crash-safe training checkpoints in a run folder.

Layout::

    RUN/checkpoints/step_00000120/model.safetensors    the model weights
                                  ema.safetensors      the EMA weights (when EMA is on)
                                  trainer_state.pt     optimiser, scheduler, RNG states, sampler memory
                                  state.json           step, epoch, sampler position, file list (readable)
    RUN/checkpoints/latest                              name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed, then renamed into place
(``os.replace``: atomic on POSIX), and only then is ``latest`` rewritten (temp file + ``os.replace``).
So a kill at any moment leaves ``latest`` naming a complete checkpoint: either the new one or the
previous one. Leftover temporary folders are removed by the next save and ignored by loading.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpl_fast.data.io import atomic_write_bytes
from cpl_fast.models import load_checkpoint, save_model_state

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
STATE_JSON = "state.json"
TRAINER_STATE = "trainer_state.pt"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A run folder has no usable checkpoint; the message says what is missing."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, trainer_state: Mapping[str, Any],
                    info: Mapping[str, Any], ema: nn.Module | None = None, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``trainer_state``: tensors and containers for ``torch.save`` (optimiser, scheduler, RNG states);
    ``info``: JSON-able summary (step, epoch, sampler position). Returns the checkpoint folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        files = [MODEL_FILE]
        save_model_state(model, tmp / MODEL_FILE)
        if ema is not None:
            save_model_state(ema, tmp / EMA_FILE)
            files.append(EMA_FILE)
        torch.save(dict(trainer_state), tmp / TRAINER_STATE)
        files.append(TRAINER_STATE)
        (tmp / STATE_JSON).write_text(json.dumps({**info, "step": step, "files": files}, indent=2),
                                      encoding="utf-8")
        for file in tmp.iterdir():
            _fsync_file(file)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. the end save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_bytes(root / LATEST, name.encode("utf-8"))
    _prune(root, keep, name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The folder ``latest`` names; CheckpointError when the run folder has none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    pointer = run_dir / CHECKPOINT_DIR / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"run folder {run_dir} has no checkpoint ({pointer} is missing): "
                              f"nothing to resume")
    folder = run_dir / CHECKPOINT_DIR / pointer.read_text(encoding="utf-8").strip()
    missing = [f for f in (STATE_JSON, TRAINER_STATE, MODEL_FILE) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    return folder


def read_checkpoint(folder: str | Path, model: nn.Module, ema: nn.Module | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` (and ``ema``); return ``(info, trainer_state)``."""
    folder = Path(folder)
    info = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    load_checkpoint(model, folder / MODEL_FILE, strict=True)
    if ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise CheckpointError(f"checkpoint {folder} has no EMA weights but EMA is enabled")
        load_checkpoint(ema, folder / EMA_FILE, strict=True)
    # weights_only=False: the state holds numpy / Python RNG states (tuples, arrays) we wrote ourselves.
    trainer_state = torch.load(folder / TRAINER_STATE, map_location=map_location, weights_only=False)
    return info, trainer_state

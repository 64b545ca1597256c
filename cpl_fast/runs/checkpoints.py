"""Crash-safe training checkpoints in a run folder, read back without running anything they contain.

Layout::

    RUN/checkpoints/step_00000120/model.safetensors    the model weights
                                  ema.safetensors      the EMA weights (when EMA is on)
                                  trainer_state.pt     optimiser, scheduler, RNG states, sampler memory
                                  state.json           step, epoch, sampler position, file list and sizes
    RUN/checkpoints/latest                              name of the newest complete checkpoint

Writing. A checkpoint is written into a hidden temporary folder, flushed, then renamed into place
(``os.replace``: atomic on POSIX), and only then is ``latest`` rewritten (temp file + ``os.replace``).
Saving a step that already exists swaps the new folder with the old one in one atomic exchange
(``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere the old folder is first renamed to
``.replaced-step_N`` and still counts as that step until the new one is in place). So a kill at any
moment leaves ``latest`` naming a complete checkpoint: either the new one or the previous one.
Leftover temporary folders are removed by the next save and ignored by loading. Weights that are not
finite are never saved as a checkpoint (:class:`NonFiniteWeightsError`).

Reading. ``trainer_state.pt`` is read with ``torch.load(weights_only=True)`` and an allow-list of
exactly what a trainer state holds besides tensors and plain containers (numpy arrays, for numpy's
RNG state); a file that asks for anything else is refused with :class:`UnsafeCheckpointError` and
never unpickled. The weights are safetensors files. :func:`latest_checkpoint` follows ``latest`` only
to a ``step_N`` folder of the same run, and when that checkpoint is missing or incomplete (a file
missing or of the wrong size, a header that does not parse) falls back to the newest complete one
with a warning; :func:`load_newest_checkpoint` also falls back when a file turns out to be corrupt
while it is read.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import pickle
import re
import shutil
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpl_fast.atomic_files import atomic_write_bytes, temporary_folder
from cpl_fast.models import load_checkpoint, save_model_state
from cpl_fast.runs.layout import (
    BEST_DIR,
    BEST_JSON,
    CHECKPOINT_DIR,
    EMA_FILE,
    LATEST,
    MODEL_FILE,
    STATE_JSON,
    TRAINER_STATE,
)

_TMP_PREFIX = ".tmp-"
_REPLACED_PREFIX = ".replaced-"
_NAME = re.compile(r"step_\d{8,}")

Warn = Callable[[str], None]


class CheckpointError(ValueError):
    """A run folder has no usable checkpoint; the message says what is missing."""


class UnsafeCheckpointError(CheckpointError):
    """A trainer state asks to run or build Python objects a trainer state never holds: refused unread."""


class NonFiniteWeightsError(FloatingPointError):
    """The weights to be saved hold NaN or infinite values; nothing was written."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (missing, incomplete or corrupt) in favour of an older complete one."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _default_warn(message: str) -> None:
    warnings.warn(message, CheckpointWarning, stacklevel=3)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot, so the caller takes another way."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _non_finite(module: nn.Module) -> list[str]:
    return [key for key, value in module.state_dict().items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _replace_folder(tmp: Path, final: Path) -> None:
    """Put ``tmp`` at ``final``; an existing ``final`` is replaced so that it never goes missing."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):  # final: the new checkpoint; tmp: the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    displaced = final.parent / f"{_REPLACED_PREFIX}{final.name}"
    shutil.rmtree(displaced, ignore_errors=True)
    os.replace(final, displaced)  # still read as this step until the new one is in place
    os.replace(tmp, final)
    shutil.rmtree(displaced, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, trainer_state: Mapping[str, Any],
                    position: Mapping[str, Any], ema: nn.Module | None = None, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``trainer_state``: tensors and containers for ``torch.save`` (optimiser, scheduler, RNG states);
    ``position``: where the run stands, JSON-able (step, epoch, data order). Returns the checkpoint folder.
    Raises :class:`NonFiniteWeightsError` (and writes nothing) when the weights are not finite.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for label, module in (("model", model), ("EMA", ema)):
        bad = _non_finite(module) if module is not None else []
        if bad:
            raise NonFiniteWeightsError(
                f"the {label} weights at step {step} are not finite (NaN or inf in {len(bad)} tensor(s), "
                f"e.g. {bad[0]}): not saved as a checkpoint; the run diverged (lower optim.lr, set "
                f"optim.grad_clip, or check the data)")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    final = root / name
    tmp = temporary_folder(root, f"{_TMP_PREFIX}{name}-")
    try:
        files = [MODEL_FILE]
        save_model_state(model, tmp / MODEL_FILE)
        if ema is not None:
            save_model_state(ema, tmp / EMA_FILE)
            files.append(EMA_FILE)
        torch.save(dict(trainer_state), tmp / TRAINER_STATE)
        files.append(TRAINER_STATE)
        sizes = {file: (tmp / file).stat().st_size for file in files}
        (tmp / STATE_JSON).write_text(json.dumps({**position, "step": step, "files": files, "sizes": sizes},
                                                 indent=2), encoding="utf-8")
        for file in tmp.iterdir():
            _fsync_file(file)
        _fsync_dir(tmp)
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_bytes(root / LATEST, name.encode("utf-8"))
    _prune(root, keep, name)
    return final


def save_best(run_dir: str | Path, model: nn.Module, record: Mapping[str, Any],
              ema: nn.Module | None = None) -> Path:
    """Write ``RUN/checkpoints/best`` (the weights, and ``best.json``: the step and its scores),
    replacing the previous best atomically. Rotation (``keep``) never touches it."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(root, f"{_TMP_PREFIX}{BEST_DIR}-")
    try:
        save_model_state(model, tmp / MODEL_FILE)
        if ema is not None:
            save_model_state(ema, tmp / EMA_FILE)
        (tmp / BEST_JSON).write_text(json.dumps(dict(record), indent=1), encoding="utf-8")
        _fsync_dir(tmp)
        _replace_folder(tmp, root / BEST_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    return root / BEST_DIR


def _prune(root: Path, keep: int, current: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for displaced in root.glob(f"{_REPLACED_PREFIX}step_*"):
        if (root / displaced.name[len(_REPLACED_PREFIX):]).is_dir():
            shutil.rmtree(displaced, ignore_errors=True)


# ------------------------------------------------------------------------------------ checking

def _read_state_json(folder: Path) -> dict[str, Any]:
    path = folder / STATE_JSON
    try:
        position = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {STATE_JSON}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: {STATE_JSON} is corrupt ({exc})") from None
    if not isinstance(position, dict) or not isinstance(position.get("step"), int):
        raise CheckpointError(f"checkpoint {folder}: {STATE_JSON} is not a checkpoint summary "
                              f"(no integer 'step')")
    return position


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not complete (header and length), or None; no tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"{path.name} is truncated or corrupt (header of {length} bytes in a {size}-byte file)"
        try:
            header = json.loads(fh.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} has a corrupt header"
    if not isinstance(header, dict):
        return f"{path.name} has a corrupt header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    described = 8 + length + max(ends, default=0)
    if described != size:
        return f"{path.name} is truncated or corrupt ({described} bytes described, {size} in the file)"
    return None


def checkpoint_problems(folder: str | Path) -> list[str]:
    """Why a checkpoint folder is not complete (empty when it is).

    Cheap checks, no tensor is read: ``state.json`` parses and lists its files, each is present (with
    the size ``state.json`` recorded, for checkpoints that record it), the safetensors headers parse and
    match the file lengths, and ``trainer_state.pt`` is a whole zip archive.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"checkpoint {folder} does not exist"]
    try:
        position = _read_state_json(folder)
    except CheckpointError as exc:
        missing = [f for f in (STATE_JSON, TRAINER_STATE, MODEL_FILE) if not (folder / f).is_file()]
        if missing:
            return [f"checkpoint {folder} is incomplete: missing {', '.join(missing)}"]
        return [str(exc)]
    files = position.get("files", [MODEL_FILE, TRAINER_STATE])
    plain = isinstance(files, list) and all(isinstance(f, str) and Path(f).name == f for f in files)
    if not plain:
        return [f"checkpoint {folder}: {STATE_JSON} has a malformed file list"]
    missing = [f for f in sorted(set(files) | {MODEL_FILE, TRAINER_STATE}) if not (folder / f).is_file()]
    if missing:
        return [f"checkpoint {folder} is incomplete: missing {', '.join(missing)}"]
    problems = []
    sizes = position.get("sizes") if isinstance(position.get("sizes"), dict) else {}
    for file in files:
        path = folder / file
        if file in sizes and path.stat().st_size != sizes[file]:
            problems.append(f"{file} has {path.stat().st_size} bytes, {STATE_JSON} recorded {sizes[file]}")
        elif file.endswith(".safetensors"):
            problem = _safetensors_problem(path)
            if problem:
                problems.append(problem)
        elif file == TRAINER_STATE:
            try:
                with zipfile.ZipFile(path) as archive:
                    archive.namelist()
            except (zipfile.BadZipFile, OSError) as exc:
                problems.append(f"{file} is truncated or corrupt ({exc})")
    return [f"checkpoint {folder} is corrupt: {p}" for p in problems]


def _step_of(folder: Path) -> int:
    return int(folder.name.rsplit("_", 1)[1])


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a run, newest step first (a ``.replaced-`` folder stands for its step
    while the step's own folder is missing, the state a save interrupted mid-replacement leaves)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = {p.name: p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)}
    for displaced in root.glob(f"{_REPLACED_PREFIX}step_*"):
        name = displaced.name[len(_REPLACED_PREFIX):]
        if _NAME.fullmatch(name) and name not in found and displaced.is_dir():
            found[name] = displaced
    return sorted(found.values(), key=_step_of, reverse=True)


def _named_by_latest(run_dir: Path) -> tuple[Path | None, str | None]:
    """``(folder latest names, why it is unusable)``; the folder is always inside the run's checkpoints."""
    root = run_dir / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None, f"{pointer} is missing"
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{pointer} is unreadable ({exc})"
    if not _NAME.fullmatch(name):
        return None, f"{pointer} names {name[:80]!r}, not a step_N checkpoint of this run folder"
    folder = root / name
    if not folder.is_dir():
        displaced = root / f"{_REPLACED_PREFIX}{name}"
        if displaced.is_dir() and not checkpoint_problems(displaced):
            return displaced, None
        return None, f"{pointer} names {name}, which does not exist"
    problems = checkpoint_problems(folder)
    return (folder, None) if not problems else (None, "; ".join(problems))


def latest_checkpoint(run_dir: str | Path, warn: Warn | None = None) -> Path:
    """The complete checkpoint ``latest`` names, else (with a warning) the newest complete one;
    CheckpointError when the run folder has none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    folder, why = _named_by_latest(run_dir)
    if folder is not None:
        return folder
    candidates = checkpoint_folders(run_dir)
    pointer = run_dir / CHECKPOINT_DIR / LATEST
    if not candidates and not pointer.is_file():
        raise CheckpointError(f"run folder {run_dir} has no checkpoint ({pointer} is missing)")
    skipped = []
    for candidate in candidates:
        problems = checkpoint_problems(candidate)
        if not problems:
            (warn or _default_warn)(f"{why}: using {candidate}, the newest complete checkpoint")
            return candidate
        skipped += problems
    raise CheckpointError(f"run folder {run_dir} has no complete checkpoint: {why}"
                          + "".join(f"; {p}" for p in skipped if p not in why))


# ------------------------------------------------------------------------------------- reading

def _trainer_state_globals() -> list[Any]:
    """What a trainer state holds besides tensors and plain containers: numpy arrays (numpy's RNG state)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


def load_trainer_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A ``trainer_state.pt`` read with ``weights_only=True`` and the allow-list above.

    :class:`UnsafeCheckpointError` when the file refers to any other Python object (it is not
    unpickled), :class:`CheckpointError` when it is missing, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is corrupt (not a torch.save archive)")
    try:
        with torch.serialization.safe_globals(_trainer_state_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is not None:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it refers to the Python object {found[1]}, which a trainer state "
                f"never holds (only tensors, numbers, strings, containers and numpy arrays are read); the "
                f"file may be hostile and was not unpickled") from None
        raise CheckpointError(f"{path} is corrupt ({str(exc).splitlines()[0]})") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a trainer state")
    return state


def read_checkpoint(folder: str | Path, model: nn.Module, ema: nn.Module | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` (and ``ema``); return ``(position, trainer_state)``.

    CheckpointError naming the file for anything missing, corrupt or refused (see the module docstring).
    """
    folder = Path(folder)
    problems = checkpoint_problems(folder)
    if problems:
        raise CheckpointError("; ".join(problems))
    position = _read_state_json(folder)
    targets = [(model, MODEL_FILE)] + ([(ema, EMA_FILE)] if ema is not None else [])
    if ema is not None and not (folder / EMA_FILE).is_file():
        raise CheckpointError(f"checkpoint {folder} has no EMA weights but EMA is enabled")
    for module, file in targets:
        try:
            load_checkpoint(module, folder / file, strict=True)
        except (ValueError, FileNotFoundError) as exc:
            raise CheckpointError(f"checkpoint {folder}: {file} cannot be loaded ({exc})") from None
    trainer_state = load_trainer_state(folder / TRAINER_STATE, map_location=map_location)
    return position, trainer_state


def load_newest_checkpoint(run_dir: str | Path, model: nn.Module, ema: nn.Module | None = None,
                           map_location: str | torch.device = "cpu", warn: Warn | None = None,
                           ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``(folder, position, trainer_state)`` of the newest checkpoint that reads completely.

    The one ``latest`` names first; a checkpoint that is missing, incomplete or corrupt is skipped with a
    warning for the next older one. A refused (hostile) trainer state stops here: it is never skipped.
    """
    warn = warn or _default_warn
    first = latest_checkpoint(run_dir, warn=warn)
    order = [first] + [p for p in checkpoint_folders(run_dir) if p != first and _step_of(p) < _step_of(first)]
    reasons = []
    for folder in order:
        try:
            position, state = read_checkpoint(folder, model, ema, map_location=map_location)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            reasons.append(str(exc))
            continue
        if reasons:
            warn(f"{'; '.join(reasons)}: using {folder}, the newest complete checkpoint")
        return folder, position, state
    raise CheckpointError(f"run folder {run_dir} has no readable checkpoint: {'; '.join(reasons)}")

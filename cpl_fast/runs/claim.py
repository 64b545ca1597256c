"""Taking a run folder for a run: a new unique folder, or a named one that holds no run (unless it is
to be resumed or overwritten), locked for as long as the run lasts; the folders a failed start
created are removed again.

The lock and the folder operations are :mod:`cpl_fast.runs.folder`'s; this module decides which
folder a run gets and undoes a start that fails.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpl_fast.runs.checkpoints import CheckpointError, checkpoint_folders
from cpl_fast.runs.folder import (
    RunFolderError,
    RunLock,
    clear_run,
    create_unique_folder,
    holds_run,
    remove_if_unused,
)
from cpl_fast.runs.layout import CHECKPOINT_DIR, LATEST

log = logging.getLogger(__name__)


def has_checkpoint(folder: Path) -> bool:
    """Whether a run folder has a checkpoint to resume (``latest``, or a step folder to fall back to)."""
    return (folder / CHECKPOINT_DIR / LATEST).is_file() or bool(checkpoint_folders(folder))


def newest_run(config: Mapping[str, Any]) -> Path:
    root = Path(config["run"]["root"])
    runs = (p for p in root.glob(f"{config['name']}-*") if (p / CHECKPOINT_DIR / LATEST).is_file())
    candidates = sorted(runs, key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no run of {config['name']!r} with a checkpoint under {root}/ to resume")
    return candidates[-1]


@dataclass
class RunClaim:
    """A run folder this process holds: its lock, and the folders it created (removed if the start fails)."""

    folder: Path
    lock: RunLock
    created: list[Path] = field(default_factory=list)

    def release(self, failed: bool) -> None:
        self.lock.release()
        if failed:
            for folder in reversed(self.created):
                if folder == self.folder:
                    remove_if_unused(folder)
                else:
                    try:
                        folder.rmdir()  # only when empty
                    except OSError:
                        break


def missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out[::-1]


def claim_run(config: Mapping[str, Any], run_dir: Path | None, resume: bool, overwrite: bool) -> RunClaim:
    """Create (exclusively) or open the run folder and lock it; refuse a fresh run on an existing one."""
    if run_dir is None:
        root = Path(config["run"]["root"])
        created = missing_folders(root)
        folder = create_unique_folder(root, config["name"])
        claim = RunClaim(folder, RunLock(folder), created + [folder])
        claim.lock.acquire()
        return claim
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder")
    created = missing_folders(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = RunClaim(run_dir, RunLock(run_dir), created)
    try:
        claim.lock.acquire()
        existing = [] if resume else holds_run(run_dir)
        if existing and not overwrite:
            raise RunFolderError(f"run folder {run_dir} already holds a run ({', '.join(existing)}): "
                                 f"--resume {run_dir} continues it, --overwrite deletes it and starts "
                                 f"afresh; or choose another --run-dir")
        if existing:
            log.info("--overwrite: deleting the previous run in %s", run_dir)
            clear_run(run_dir)
    except BaseException:
        claim.release(failed=True)
        raise
    return claim

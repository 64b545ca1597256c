"""Run folders: unique names, one writer at a time, no silent overwrite.

* **Names.** A run named ``NAME`` gets ``<run.root>/NAME-<YYYYmmdd-HHMMSS>``, created with an
  exclusive ``mkdir``: a second run started in the same second gets ``...-HHMMSS-2`` (then ``-3``...),
  never the first one's folder. ``NAME`` (and each baseline's name, a sub-folder) must be a plain
  folder name: no ``/``, no ``..``.
* **Lock.** A run holds ``RUN/.lock`` (an exclusive ``flock``) from before its first write to its
  exit; the file records who holds it (process id, host, start time, command). A second ``cpl-train``
  on the same folder, fresh or ``--resume``, stops at once with :class:`RunFolderBusy` naming the
  holder. The lock dies with its process (a killed run can be resumed at once); the file stays and
  is harmless.
* **Fresh runs.** A fresh run refuses a folder that already holds a run (``config.yaml``,
  ``checkpoints/`` or ``result.json``) unless told to replace it (``--overwrite``, which deletes the
  previous run's contents first); it continues one only with ``--resume``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cpl_fast.runs.layout import LOCK_FILE, RUN_MARKERS


class RunFolderError(ValueError):
    """A run folder cannot be used as asked; the message says why and what to do."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock."""


def check_folder_name(name: Any, what: str = "name") -> str:
    """``name`` when it is a plain folder name (no separators, not ``.`` or ``..``), else RunFolderError."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).is_absolute() or name != name.strip():
        raise RunFolderError(f"{what} must be a plain folder name (no '/', '..' or surrounding spaces); "
                             f"got {name!r}")
    return name


def holds_run(folder: str | Path) -> list[str]:
    """The entries that make ``folder`` a run folder (empty when it holds no run)."""
    folder = Path(folder)
    return [m for m in RUN_MARKERS if (folder / m).exists()]


def create_unique_folder(root: str | Path, name: str, stamp: str | None = None) -> Path:
    """Create and return ``root/name-<stamp>`` exclusively (``-2``, ``-3``... when it exists)."""
    check_folder_name(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        folder = root / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RunFolderError(f"no free run folder name {name}-{stamp}-N under {root}")


class RunLock:
    """The exclusive lock of a run folder (``RUN/.lock``), held until :meth:`release` or exit."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """Who holds (or last held) the lock, as the lock file records it."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return (f"process {info.get('pid')} on {info.get('host')} since {info.get('since')} "
                    f"({info.get('command')})")
        except (OSError, ValueError, AttributeError):
            return "another process"

    def check_free(self) -> None:
        """RunFolderBusy when another process holds the lock now (nothing is created or kept)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody has held it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy() from None
        finally:
            os.close(fd)

    def _busy(self) -> RunFolderBusy:
        return RunFolderBusy(f"run folder {self.folder} is in use by {self.holder()}: one run writes a "
                             f"folder at a time (lock {self.path}); wait for it, or use another folder")

    def acquire(self) -> RunLock:
        """Take the lock (the folder must exist); RunFolderBusy naming the holder when it is taken."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy() from None
        except BaseException:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def clear_run(folder: str | Path) -> None:
    """Delete everything in a run folder but its lock (``--overwrite``; the caller holds the lock)."""
    for entry in Path(folder).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_if_unused(folder: str | Path) -> None:
    """Remove a folder this process created when it holds nothing but the lock file (a failed start)."""
    folder = Path(folder)
    try:
        entries = [e.name for e in folder.iterdir()]
    except OSError:
        return
    if set(entries) <= {LOCK_FILE}:
        shutil.rmtree(folder, ignore_errors=True)

"""Atomic file writes with ordinary permissions: a temporary file next to the target, then ``os.replace``.

Readers never see a half-written file and an interrupted write leaves the old file intact.
``tempfile`` creates its files 0600 and its folders 0700, and a rename keeps that mode, so the result
is widened to what ``open`` (0666) or ``mkdir`` (0777) would have given under the current umask:
checkpoints, images and reports are then readable by whoever may read the user's other files.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask_mode(folder: bool = False) -> int:
    """The mode a new file (or folder) gets from the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to. When the block ends normally the file is
    synced, given the umask's mode and moved onto ``path``; when it raises, it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module); the parent folder is created when missing."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def temporary_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder in ``parent`` (to be renamed into place later) with the mode ``mkdir`` would give."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, umask_mode(folder=True))
    return folder

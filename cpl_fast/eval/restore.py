"""Restore image files and folders into an output folder (the ``cpl-restore`` command's work).

Inputs are files or folders (searched recursively for image files); each output is an 8-bit PNG
at the input's path relative to the folder it was found in (``photo.jpg`` -> ``DIR/photo.png``),
written atomically. Every output name is unique: inputs that would write the same output
(``dirA/a.png`` and ``dirB/a.png``, ``x.png`` and ``x.PNG``; names are compared case-insensitively,
as some file systems do) are refused up front, listed, before anything is restored. Existing outputs
are kept unless ``force``; a file that cannot be read (missing, corrupt, not an image) or whose output
cannot be written (no permission, disk full) is reported and skipped, never fatal for the others.
Greyscale inputs are restored as RGB, alpha channels dropped with a warning
(``cpl_fast.data.io.read_image``).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from cpl_fast.data.io import ImageReadError, error_text, is_image_file, read_image, write_png
from cpl_fast.inference.restoration import DEFAULT_OVERLAP, check_tiling, model_multiple, restore_image


@dataclass
class RestoreSummary:
    """What ``restore_files`` did: outputs written, inputs skipped (exists) and failed (with why)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"restored {len(self.written)} image(s), skipped {len(self.skipped)}, "
               f"failed {len(self.failed)}"]
        out += [f"  skipped {path}: {why}" for path, why in self.skipped]
        out += [f"  failed  {path}: {why}" for path, why in self.failed]
        return out


def collect_inputs(paths: Iterable[str | Path]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """``([(input, output name relative to DIR)], [(path, problem)])`` for files and folders.

    A folder contributes its image files (recursively, hidden ones left out) under their relative
    paths; a file its own name. Two inputs whose outputs differ only by their extensions (``a.jpg``
    and ``a.png``) keep the extensions in the name (``a_jpg.png``, ``a_png.png``). The same file given
    twice counts once. :class:`OutputCollision` when two inputs would still write one output.
    """
    found: list[tuple[Path, Path]] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(src: Path, rel: Path) -> None:
        key = src.resolve()
        if key not in seen:
            seen.add(key)
            found.append((src, rel))

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not images:
                problems.append((path, "folder holds no image files"))
            for p in images:
                add(p, p.relative_to(path))
        elif path.is_file():
            add(path, Path(path.name))
        else:
            problems.append((path, "no such file or folder"))
    names: dict[Path, int] = {}
    for _, rel in found:
        key = rel.with_suffix(".png")
        names[key] = names.get(key, 0) + 1
    out = []
    for src, rel in found:
        name = rel.with_suffix(".png")
        if names[name] > 1:
            name = rel.with_name(f"{rel.stem}_{rel.suffix.lstrip('.').lower() or 'noext'}.png")
        out.append((src, name))
    by_output: dict[str, list[tuple[Path, Path]]] = {}
    for src, name in out:
        by_output.setdefault(name.as_posix().casefold(), []).append((src, name))
    clashes = [group for group in by_output.values() if len(group) > 1]
    if clashes:
        lines = [f"  {group[0][1].as_posix()} <- " + ", ".join(str(src) for src, _ in group)
                 for group in clashes]
        raise OutputCollision(f"{len(clashes)} output name(s) would be written by more than one input (names "
                              f"are compared ignoring case); restore these into separate output folders or "
                              f"rename them:\n" + "\n".join(lines))
    return out, problems


class OutputCollision(ValueError):
    """Two or more inputs would write the same output file; the message lists them."""


def check_output_dir(out_dir: str | Path) -> Path:
    """The output folder, checked without creating it: ValueError when it (or the nearest existing folder
    above it) is a file or not writable."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} is a file, not a folder")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output folder {out_dir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == out_dir:
            raise ValueError(f"output folder {out_dir} is not writable")
        raise ValueError(f"output folder {out_dir} cannot be created: folder {existing} is not writable")
    return out_dir


def restore_files(model: nn.Module, inputs: Sequence[str | Path], out_dir: str | Path, force: bool = False,
                  tile: int | str | None = "auto", overlap: int = DEFAULT_OVERLAP, amp: str = "auto",
                  progress: bool = True, log: Callable[[str], None] | None = None) -> RestoreSummary:
    """Restore every image of ``inputs`` into ``out_dir`` (see the module docstring)."""
    from tqdm.auto import tqdm

    out_dir = check_output_dir(out_dir)
    if isinstance(tile, int):
        check_tiling(tile, overlap, model_multiple(model))  # before any file is touched
    items, problems = collect_inputs(inputs)
    summary = RestoreSummary(failed=list(problems))
    model.eval()
    for src, name in tqdm(items, desc="restoring", disable=not progress or len(items) < 2):
        target = out_dir / name
        if target.exists() and target.resolve() == src.resolve():
            summary.skipped.append((src, f"output {target} is the input itself"))
            continue
        if target.exists() and not force:
            summary.skipped.append((src, f"{target} exists (--force to overwrite)"))
            continue
        if target.exists() and target.is_dir():
            summary.failed.append((src, f"output {target} is a folder"))
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = read_image(src)
            for w in caught:  # passed on (alpha dropped), to the log when there is one
                if log is not None:
                    log(f"warning: {w.message}")
                else:
                    warnings.warn(str(w.message), w.category, stacklevel=2)
        except (ImageReadError, FileNotFoundError, OSError) as exc:
            summary.failed.append((src, str(exc)))
            continue
        announce = None
        if log is not None:
            def announce(text: str, src: Path = src) -> None:
                log(f"{src}: {text}")
        try:
            result = restore_image(model, image, tile=tile, overlap=overlap, amp=amp, progress=progress,
                                   log=announce)
        except MemoryError as exc:
            summary.failed.append((src, str(exc)))
            continue
        try:
            write_png(target, result.image[0].cpu())
        except OSError as exc:  # no permission, disk full, a file where a folder should be
            summary.failed.append((src, f"cannot write {target}: {error_text(exc)}"))
            continue
        summary.written.append(target)
    return summary

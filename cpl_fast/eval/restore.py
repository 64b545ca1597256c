"""Restore image files and folders into an output folder (the ``cpl-restore`` command's work).

Inputs are files or folders (searched recursively for image files); each output is an 8-bit PNG
at the input's path relative to the folder it was found in (``photo.jpg`` -> ``DIR/photo.png``),
written atomically. Existing outputs are kept unless ``force``; a file that cannot be read (missing,
corrupt, not an image) is reported and skipped, never fatal. Greyscale inputs are restored as RGB,
alpha channels dropped with a warning (``cpl_fast.data.io.read_image``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from cpl_fast.data.io import ImageReadError, is_image_file, read_image, write_png
from cpl_fast.eval.inference import DEFAULT_OVERLAP, check_tiling, model_multiple, restore_image


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
    paths; a file its own name. Two inputs that would write the same output (``a.jpg`` and
    ``a.png``) keep their extensions in the name (``a_jpg.png``, ``a_png.png``).
    """
    found: list[tuple[Path, Path]] = []
    problems: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not images:
                problems.append((path, "folder holds no image files"))
            found += [(p, p.relative_to(path)) for p in images]
        elif path.is_file():
            found.append((path, Path(path.name)))
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
    return out, problems


def check_output_dir(out_dir: str | Path) -> Path:
    """The output folder; ValueError when the path is an existing file (created later when missing)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} is a file, not a folder")
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
        result = restore_image(model, image, tile=tile, overlap=overlap, amp=amp)
        write_png(target, result.image[0].cpu())
        summary.written.append(target)
    return summary

"""The pair sources a config's ``data`` section names: what training trains on and what it, and
``cpl-eval``, score. One function each, so a layout is read the same way by every command.

* ``embedded``: the built-in three-task set (its train and test halves);
* ``clean``: a folder of clean images, each under every degradation of ``data.tasks`` (synthesised on
  load); its test set is ``data.test_root``, degraded the same way, when given;
* a layout of :mod:`cpl_fast.data.layouts`: its declared splits (``data.train_split`` /
  ``data.test_split``, default ``train`` / ``test``) of ``data.root`` (the test split of
  ``data.test_root`` when given); a layout without splits holds one set, so its test set is
  ``data.test_root``, or for a command that only scores, ``data.root`` itself.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cpl_fast.data.datasets import FilePairs, PairSource
from cpl_fast.data.degradations import DEGRADATIONS
from cpl_fast.data.io import is_image_file
from cpl_fast.data.layouts import LAYOUTS, LayoutError, Sample


class DataSourceError(LayoutError):
    """A config's ``data`` section names data that cannot be read; the message names the setting."""


def _clean_samples(folder: Path, tasks: Sequence[str]) -> list[Sample]:
    """Every clean image of ``folder`` under every degradation of ``tasks``."""
    if not folder.is_dir():
        raise DataSourceError(f"data root {folder} does not exist (layout 'clean' reads a folder of clean "
                              f"images)")
    unknown = [t for t in tasks if t not in DEGRADATIONS]
    if unknown:
        raise DataSourceError(f"data.tasks has unknown degradations {unknown}; known: {sorted(DEGRADATIONS)}")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not images:
        raise DataSourceError(f"data root {folder} holds no images")
    return [Sample(target=p, task=t, degradation=t) for t in tasks for p in images]


def _existing(root: str | None, layout: str) -> Path:
    if root is None:
        raise DataSourceError(f"data layout {layout!r} needs a data root: pass --data ROOT or "
                              f"--set data.root=ROOT")
    path = Path(root)
    if not path.exists():
        raise DataSourceError(f"data root {path} does not exist")
    return path


def _from_layout(layout: str, root: Path, split: str | None) -> PairSource:
    return FilePairs.from_layout(layout, str(root), split if LAYOUTS[layout].splits is not None else None)


def training_pairs(data: Mapping[str, Any]) -> PairSource:
    """The training pairs of a data config."""
    layout = data["layout"]
    if layout == "embedded":
        from cpl_fast.data.embedded import embedded_pairs

        return embedded_pairs("train")
    root = _existing(data["root"], layout)
    if layout == "clean":
        return FilePairs(_clean_samples(root, data["tasks"]))
    return _from_layout(layout, root, data["train_split"] or "train")


def evaluation_pairs(data: Mapping[str, Any], root_is_test: bool = False) -> PairSource | None:
    """The test pairs of a data config; None when it has none (see the module docstring).

    ``root_is_test``: ``data.root`` is the set to score when its layout has no splits (``cpl-eval
    --data ROOT``), rather than the training set.
    """
    layout = data["layout"]
    if layout == "embedded":
        from cpl_fast.data.embedded import embedded_pairs

        return embedded_pairs("test")
    if layout == "clean":
        return FilePairs(_clean_samples(Path(data["test_root"]), data["tasks"])) if data["test_root"] else None
    if LAYOUTS[layout].splits is None and not data["test_root"] and not root_is_test:
        return None
    root = _existing(data["test_root"] or data["root"], layout)
    return _from_layout(layout, root, data["test_split"] or "test")


def data_sources(data: Mapping[str, Any]) -> tuple[PairSource, PairSource | None]:
    """``(training_pairs(data), evaluation_pairs(data))``, the training pairs checked first."""
    return training_pairs(data), evaluation_pairs(data)

"""Figures shared by the training report and ``cpl-analyze``: matplotlib without a display, and the
selection histograms of prompt experts."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _selection_shares(level: Mapping[str, Any]) -> np.ndarray:
    """A level's average selection distribution: normalised counts, or the mean softmax when dense."""
    values = np.asarray(level["mean_probs"] if level["dense"] else level["counts"], dtype=float)
    return values / values.sum() if values.sum() > 0 else values


def plot_selection_histograms(runs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], path: Path,
                              title: str = "") -> Path:
    """Selection frequency of every expert: one row per run and level, one column per task.

    ``runs[name][task]`` is the list of a task's per-level statistics (``level_statistics``: ``dense``,
    ``counts``, ``mean_probs``), as ``entropy_table`` and the training report's scores hold them; the
    dashed line is the uniform share ``1/n``. Used by ``cpl-analyze`` (one run) and the report.
    """
    plt = pyplot()
    tasks = list(dict.fromkeys(task for table in runs.values() for task in table))
    rows = [(name, lv) for name, table in runs.items() for lv in range(len(next(iter(table.values()))))]
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(1.2 + 2.1 * len(tasks), 0.9 + 1.6 * len(rows)),
                             sharey=True, squeeze=False)
    dense_kinds = set()
    for r, (name, lv) in enumerate(rows):
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            levels = runs[name].get(task)
            if levels is None or lv >= len(levels):
                ax.text(0.5, 0.5, "not scored", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                ax.set_xticks([])
            else:
                dense_kinds.add(bool(levels[lv]["dense"]))
                values = _selection_shares(levels[lv])
                ax.bar(range(len(values)), values, color=f"C{lv}")
                ax.axhline(1 / len(values), color="k", ls="--", lw=0.8, alpha=0.6)
                ax.set_xticks(range(len(values)))
                ax.tick_params(labelsize=7)
            ax.set_ylim(0, 1)
            ax.set_yticks([0, 0.5, 1])
            if r == 0:
                ax.set_title(task, fontsize=9)
            if c == 0:
                kind = "\n(mean softmax)" if levels is not None and levels[lv]["dense"] else ""
                label = f"level {lv}" if len(runs) == 1 else f"{name}\nlevel {lv}{kind}"
                ax.set_ylabel(label, fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("expert", fontsize=8)
    what = {frozenset({False}): "share of selections per expert",
            frozenset({True}): "mean router softmax per expert"}.get(
        frozenset(dense_kinds), "share of selections per expert (dense runs: mean router softmax)")
    fig.suptitle(f"{title}: {what}" if title else what, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

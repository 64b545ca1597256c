"""The record of validations during training (``eval.every``): the values each one logs, and the best.

A validation's values are what cpl-eval reports for the same weights: the papers' unweighted mean
over tasks (PSNR, SSIM), each task's PSNR, and the mean selection entropy of each prompt level.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cpl_fast.metrics.protocols import average


def validation_values(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The scalars of one validation from its per-task scores (``eval.scoring.evaluate``)."""
    values = average(scores)
    values.update({f"psnr_{task}": s["psnr"] for task, s in scores.items()})
    levels = len(next(iter(scores.values()))["levels"])
    for level in range(levels):
        values[f"selection_entropy_l{level}"] = float(np.mean(
            [s["levels"][level]["selection_entropy"] for s in scores.values() if s["levels"]]))
    return values


class Validations:
    """Every validation of a run, and the best by average PSNR (``checkpoint.keep_best``)."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None

    def add(self, step: int, values: Mapping[str, float], keep_best: bool) -> bool:
        """Record one validation; with ``keep_best``, whether it is the new best (then it is ``best``).

        Without ``keep_best`` no best is tracked, so turning it on for a resumed run starts afresh
        instead of comparing against validations whose weights were never kept."""
        record = {"step": step, **values}
        self.records.append(record)
        if not keep_best or (self.best is not None and values["psnr"] <= self.best["psnr"]):
            return False
        self.best = record
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"validations": list(self.records), "best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = list(state.get("validations") or [])
        self.best = state.get("best")

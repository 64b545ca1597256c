"""The weight of the CPR term at each step: warm-up, ramp, and the calibration from the first CPR batch.

``cpr.alpha_relative`` sets alpha where it is first needed, so that ``alpha * L_pos`` is that fraction
of L1 whatever the feature extractor's scale; the logistic form with ``cpr.tau: null`` takes ``L_pos``
of that batch as its temperature. Both are measured once and saved with the trainer state, so a
resumed run keeps them instead of measuring again on a different batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from cpl_fast.config import Settings


class CprWeight:
    """alpha (and the logistic tau) of the CPR loss, step by step."""

    def __init__(self, settings: Settings) -> None:
        self.cpr = settings.cpr
        self.enabled = settings.objective != "l1"
        self.calibration: dict[str, float] = {}

    def alpha(self, step: int) -> float:
        """The CPR weight at optimiser step ``step``: 0 during ``cpr.warmup_steps``, then ramped in."""
        base = self.calibration.get("alpha", self.cpr.alpha)
        start, ramp = self.cpr.warmup_steps, self.cpr.ramp_steps
        if step < start:
            return 0.0
        if ramp > 0:
            return base * min(1.0, (step - start + 1) / ramp)
        return base

    def in_warmup(self, step: int) -> bool:
        """Plain L1 at this step (before ``cpr.warmup_steps``): no negatives need decoding."""
        return self.alpha(step) == 0.0 and self.cpr.warmup_steps > step

    def needs_calibration(self) -> bool:
        if not self.enabled:
            return False
        want_alpha = self.cpr.alpha_relative is not None and "alpha" not in self.calibration
        want_tau = self.cpr.form == "logistic" and self.cpr.tau is None and "tau" not in self.calibration
        return want_alpha or want_tau

    def calibrate(self, l1: float, l_pos: float) -> str:
        """Set what is still to be calibrated from one batch's L1 and mean ``L_pos``; the log line."""
        if not (math.isfinite(l_pos) and l_pos > 0):
            raise FloatingPointError(f"cannot calibrate CPR: L_pos of the first batch is {l_pos}")
        if self.cpr.alpha_relative is not None and "alpha" not in self.calibration:
            self.calibration["alpha"] = self.cpr.alpha_relative * l1 / l_pos
        if self.cpr.form == "logistic" and self.cpr.tau is None and "tau" not in self.calibration:
            self.calibration["tau"] = l_pos
        return (f"CPR calibrated on the first batch (L1 {l1:.4g}, L_pos {l_pos:.4g}): "
                + ", ".join(f"{key} = {value:.4g}" for key, value in self.calibration.items()))

    def prepare(self, loss: Any, step: int, measure: Callable[[], tuple[float, float]],
                log: Callable[[str], None]) -> bool:
        """Set ``loss.alpha`` / ``loss.tau`` for this step, measuring ``(L1, L_pos)`` first when the
        calibration is due; whether this step is plain L1 (warm-up)."""
        if self.in_warmup(step):
            loss.alpha = 0.0
            return True
        if self.needs_calibration():
            log(self.calibrate(*measure()))
        loss.alpha = self.alpha(step)
        if "tau" in self.calibration:
            loss.tau = self.calibration["tau"]
        return False

    def state_dict(self) -> dict[str, float]:
        return dict(self.calibration)

    def load_state_dict(self, state: Mapping[str, float] | None) -> None:
        self.calibration = dict(state or {})

"""The training steps, one module each, and the registry the trainer picks its objective from.

Every step has the signature ``step(model, batch, features, cpr_loss, negative_sampler, m, generator, ...)
-> CPLStepOutput`` and does not call ``backward``:

* ``literal``: Algorithm 1 of the paper, one sample and one negative at a time (the oracle);
* ``loop``: batched, one pass per negative;
* ``fast``: the encoder shared by the positive and its negatives, one decode over all rows;
* ``l1``: plain L1, for the dense and sparse baselines without CPR.

The CPL steps end in ``cpl_fast.losses.cpr.cpl_loss``; ``inputs``, ``output`` and ``negative_grad`` (where
the negatives' gradient goes) hold what they share.
"""
from __future__ import annotations

from collections.abc import Callable

from cpl_fast.config import ConfigError
from cpl_fast.train.steps.fast import fast_cpl_step
from cpl_fast.train.steps.l1 import l1_step
from cpl_fast.train.steps.literal import literal_cpl_step
from cpl_fast.train.steps.loop import loop_cpl_step
from cpl_fast.train.steps.output import CPLStepOutput

StepFn = Callable[..., CPLStepOutput]

STEPS: dict[str, StepFn] = {
    "literal": literal_cpl_step,
    "loop": loop_cpl_step,
    "fast": fast_cpl_step,
    "l1": l1_step,
}


def resolve_objective(name: str) -> tuple[str, StepFn]:
    """``(name, step)`` for a config's ``objective``; ``auto`` is ``fast``, the quickest CPL step."""
    if name == "auto":
        name = "fast"
    if name not in STEPS:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(STEPS)} or auto")
    return name, STEPS[name]


__all__ = ["CPLStepOutput", "STEPS", "StepFn", "fast_cpl_step", "l1_step", "literal_cpl_step",
           "loop_cpl_step", "resolve_objective"]

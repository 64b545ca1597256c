"""Module names that moved, kept importable for one release with a DeprecationWarning.

Each old module is a two-line file calling :func:`moved`; the table below is the one list of them
(the layering test exempts exactly these files, which import upward only to forward).
"""
from __future__ import annotations

import importlib
import runpy
import sys
import warnings

REMOVED_IN = "0.3"

MOVED = {
    "cpl_fast.train.config": "cpl_fast.config",
    "cpl_fast.train.config_doc": "cpl_fast.config.doc",
    "cpl_fast.train.checkpointing": "cpl_fast.runs.checkpoints",
    "cpl_fast.train.run_folder": "cpl_fast.runs.folder",
    "cpl_fast.train.samplers": "cpl_fast.losses.negatives",
    "cpl_fast.eval.loading": "cpl_fast.runs.loading",
    "cpl_fast.eval.inference": "cpl_fast.inference.restoration",
    "cpl_fast.eval.inference_options": "cpl_fast.inference.options",
    "cpl_fast.eval.metrics": "cpl_fast.metrics.image",
    "cpl_fast.eval.protocols": "cpl_fast.metrics.protocols",
    "cpl_fast.eval.health": "cpl_fast.metrics.routing",
    # the training steps
    "cpl_fast.train.literal_step": "cpl_fast.train.steps.literal",
    "cpl_fast.train.loop_step": "cpl_fast.train.steps.loop",
    "cpl_fast.train.fast_step": "cpl_fast.train.steps.fast",
    "cpl_fast.train.step_inputs": "cpl_fast.train.steps.inputs",
    "cpl_fast.train.step_output": "cpl_fast.train.steps.output",
    "cpl_fast.train.negative_grad": "cpl_fast.train.steps.negative_grad",
    # the commands
    "cpl_fast.train.cli": "cpl_fast.cli.train",
    "cpl_fast.eval.cli": "cpl_fast.cli.eval",
    "cpl_fast.export.cli": "cpl_fast.cli.export",
    "cpl_fast.data.cli": "cpl_fast.cli.data",
    "cpl_fast.convert_cli": "cpl_fast.cli.convert",
    "cpl_fast.info": "cpl_fast.cli.info",
}


def moved(name: str, spec_name: str) -> None:
    """Make the old module ``spec_name`` the new one; run the new one when it was started with ``-m``."""
    new = MOVED[spec_name]
    warnings.warn(f"{spec_name} has moved to {new}; the old name will be removed in cpl_fast {REMOVED_IN}",
                  DeprecationWarning, stacklevel=3)
    if name == "__main__":
        runpy.run_module(new, run_name="__main__", alter_sys=True)
    else:
        sys.modules[name] = importlib.import_module(new)

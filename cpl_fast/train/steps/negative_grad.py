"""Where the negatives' gradient goes: the ``neg_grad`` setting of every CPL step.

The paper lets ``L_neg`` train everything that made a negative ``I-``: the shared network, the
prompt bank and its projection. The shared network can then lower the loss by making *any*
prompt change the output more (it imprints the prompt's spatial pattern, also onto the positive).
The modes restrict that gradient:

* ``all``: everything (the paper);
* ``no_bank``: everything but the prompt banks (``prompt_param``);
* ``prompts``: only the prompt modules (bank, router, prompt projection), not the shared network;
* ``none``: nothing; the negatives are constants and ``L_neg`` moves only the positive (through
  ``phi(I+)``, unless the loss detaches the anchor too).

``negative_pass(model, mode)`` is the context a step decodes its negatives in: parameters the mode
excludes have ``requires_grad`` off for the duration (so autograd records no path to them), and
``none`` is ``torch.no_grad``. A step that reuses an encoder state computed outside the context
must detach it for ``prompts`` and ``none`` (``detaches_shared_state``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

NEG_GRAD_MODES = ("all", "no_bank", "prompts", "none")


def check_mode(mode: str) -> str:
    if mode not in NEG_GRAD_MODES:
        raise ValueError(f"neg_grad must be one of {', '.join(NEG_GRAD_MODES)}; got {mode!r}")
    return mode


def _prompt_modules(model: nn.Module) -> list[nn.Module]:
    modules = getattr(model, "prompt_modules", None)
    if modules is None:
        raise ValueError(f"neg_grad needs a model with prompt_modules(); {type(model).__name__} has none")
    return list(modules())


def excluded_parameters(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """The parameters the negatives' gradient must not reach under ``mode``."""
    check_mode(mode)
    if mode in ("all", "none"):
        return []
    prompts = _prompt_modules(model)
    if mode == "no_bank":
        return [spm.prompt_param for spm in prompts]
    kept = {id(p) for spm in prompts for p in spm.parameters()}
    return [p for p in model.parameters() if id(p) not in kept]


def detaches_shared_state(mode: str) -> bool:
    """Whether a shared encoder state must be detached before decoding negatives from it."""
    return check_mode(mode) in ("prompts", "none")


@contextlib.contextmanager
def negative_pass(model: nn.Module, mode: str) -> Iterator[None]:
    """Decode negatives inside this context (see the module docstring)."""
    check_mode(mode)
    if mode == "none":
        with torch.no_grad():
            yield
        return
    frozen = [p for p in excluded_parameters(model, mode) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)

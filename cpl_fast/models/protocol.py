"""The encode/decode seam a backbone offers so contrastive training can share its encoder.

Every prompt of a prompted backbone is injected after some prompt-free prefix (for PromptIR:
the encoder, the latent blocks and the skip connections). ``encode`` runs that prefix once;
``decode`` runs the rest, once per routing, on a batch that may repeat each encoded sample
(``map_state`` expands it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from cpl_fast.models.spm import Routing


@runtime_checkable
class EncodeDecodeModel(Protocol):
    """A restoration model split at its first prompt.

    ``forward(x) == decode(encode(x))``. ``decode`` takes ``routing``: None (every level routes
    itself) or a list of ``num_prompt_levels`` entries in application order, each a ``Routing``
    (forced) or None.
    """

    num_prompt_levels: int
    num_prompts: int
    top_k: int | None

    def encode(self, x: torch.Tensor) -> Any:
        ...

    def decode(self, state: Any, routing: Sequence[Routing | None] | None = None,
               return_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        ...


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply ``fn`` to every tensor of an encoder state (NamedTuple, tuple, list, dict or tensor).

    Keeps the container types, so e.g. ``map_state(lambda t: t.repeat_interleave(1 + m, 0), state)``
    gives a state the decoder accepts for ``B (1 + m)`` rows.
    """
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)._make(map_state(fn, item) for item in state)
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(fn, item) for item in state)
    if isinstance(state, dict):
        return {key: map_state(fn, value) for key, value in state.items()}
    raise TypeError(f"map_state: cannot map over a {type(state).__name__}; "
                    "expected tensors in NamedTuples, tuples, lists or dicts")

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


def check_image_batch(model_name: str, x: torch.Tensor, channels: int, multiple: int) -> None:
    """Raise unless ``x`` is ``(B, channels, H, W)`` with H and W multiples of ``multiple``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model_name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{model_name}: expected an image batch (B, {channels}, H, W), "
                         f"got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"{model_name}: height and width must be multiples of {multiple} "
                         f"(the encoder halves them {multiple.bit_length() - 1} times), got {h}x{w}; "
                         "pad the input first")

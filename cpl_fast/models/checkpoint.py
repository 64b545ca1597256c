"""Load published PromptIR / CPL checkpoints and cpl_fast's own; save model weights atomically.

Accepted layouts (detected from the content, never from guesses about values):

* PromptIR's Lightning ``.ckpt``: ``{'state_dict': {'net.<key>': ...}, ...}``;
* CPL's BasicSR ``.pth``: ``{'params': ..., 'params_ema': ...}`` (the EMA weights when present);
* cpl_fast's torch files ``{'model': state_dict, ...}`` and ``*.safetensors`` model states;
* a plain state dict, with or without DDP's ``module.`` (or ``torch.compile``'s ``_orig_mod.``) prefix, or
  a LightningModule's own (every key under ``net.``).

Published prompt banks are ``(1, n, C, S, S)``; ours are ``(n, C, S, S)``, so they are reshaped.
The six 1x1 convolutions the published PromptIR builds but never uses are dropped and reported.
Files written by ``cpl-convert`` also carry ``METADATA_KEY``: the model section they were built with
(the routing, which the weights cannot tell), ignored by the published code.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cpl_fast.atomic_files import atomic_path

# Built by the published PromptIR class, never used in its forward.
UNUSED_OFFICIAL_KEYS = frozenset({
    "chnl_reduce1.weight", "chnl_reduce2.weight", "chnl_reduce3.weight",
    "reduce_noise_channel_1.weight", "reduce_noise_channel_2.weight", "reduce_noise_channel_3.weight",
})
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Top-level key of the Lightning and BasicSR files cpl-convert writes: {"model": <config model section>}.
METADATA_KEY = "cpl_fast"
# Shape mismatches listed in full at most; an architecture mismatch is summarised by the caller.
_LISTED = 12


class KeyMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model (wrong shapes, or missing / unexpected keys)."""


@dataclass
class LoadReport:
    """What ``load_checkpoint`` found and did."""

    source: str                                   # the file, or "<state dict>"
    layout: str          # lightning | basicsr:params_ema | basicsr:params | cpl_fast | plain
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)       # in the model, not in the checkpoint
    unexpected_keys: list[str] = field(default_factory=list)    # in the checkpoint, not in the model
    ignored_keys: list[str] = field(default_factory=list)       # the published, unused convolutions
    reshaped_keys: list[str] = field(default_factory=list)      # (1, n, C, S, S) prompt banks
    filled_keys: list[str] = field(default_factory=list)        # selection biases absent: zeros


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                    strict: bool = True) -> LoadReport:
    """Load weights into ``model`` from any supported checkpoint; returns a ``LoadReport``.

    Nothing is loaded unless every shared key has the model's shape (KeyMismatchError, a ValueError,
    listing the offenders) and, with ``strict``, the key sets agree (KeyMismatchError listing
    missing/unexpected keys). Unreadable files, and state dicts holding anything but tensors, raise
    ValueError naming the file.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "<state dict>", path_or_state_dict
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        source, raw = str(path_or_state_dict), read_checkpoint_file(Path(path_or_state_dict))
    else:
        raise TypeError("load_checkpoint: expected a path or a state dict, "
                        f"got {type(path_or_state_dict).__name__}")
    layout, state = _unwrap(raw, source)
    report = LoadReport(source=source, layout=layout)

    expected = model.state_dict()
    adapted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = strip_wrappers(key)
        if key in UNUSED_OFFICIAL_KEYS and key not in expected:
            report.ignored_keys.append(key)
            continue
        if (key.endswith("prompt_param") and key in expected and value.dim() == 5 and value.shape[0] == 1
                and expected[key].dim() == 4):
            value = value.squeeze(0)
            report.reshaped_keys.append(key)
        adapted[key] = value

    # Selection biases (router balancing) are absent from checkpoints trained without it: a zero bias
    # selects exactly as such a router does, so the model's zeros stand in for them.
    for key in expected:
        if key.endswith(".route_bias") and key not in adapted:
            adapted[key] = torch.zeros_like(expected[key])
            report.filled_keys.append(key)
    report.missing_keys = [key for key in expected if key not in adapted]
    report.unexpected_keys = [key for key in adapted if key not in expected]
    mismatched = [f"{key}: checkpoint {tuple(adapted[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in adapted if key in expected and adapted[key].shape != expected[key].shape]
    if mismatched:
        more = f"\n  ... ({len(mismatched) - _LISTED} more)" if len(mismatched) > _LISTED else ""
        raise KeyMismatchError(f"load_checkpoint({source}): {len(mismatched)} tensor(s) have the wrong "
                               f"shape:\n  " + "\n  ".join(mismatched[:_LISTED]) + more)
    if strict and (report.missing_keys or report.unexpected_keys):
        raise KeyMismatchError(f"load_checkpoint({source}, strict=True): keys disagree with the model "
                         f"({layout} layout)\n  missing: {_summary(report.missing_keys)}\n"
                         f"  unexpected: {_summary(report.unexpected_keys)}")
    model.load_state_dict({key: adapted[key] for key in adapted if key in expected}, strict=False)
    report.loaded_keys = [key for key in adapted if key in expected]
    return report


def save_model_state(model: nn.Module, path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s state dict to a safetensors file atomically (temp file + ``os.replace``).

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model_state: the file name must end in .safetensors, got {path.name}")
    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    info = {"format": "cpl_fast", "model": type(model).__name__, **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=info)
    return path


def read_checkpoint_file(path: Path) -> Mapping[str, Any]:
    """The dictionary a checkpoint file holds (safetensors or ``torch.save``, read on the CPU with
    ``weights_only``); FileNotFoundError / ValueError naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt/truncated files fail in many library-specific ways
        raise ValueError(f"load_checkpoint: cannot read {path} as a checkpoint "
                         f"({type(err).__name__}: {err})") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"load_checkpoint: {path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]
                    ) -> tuple[str, dict[str, torch.Tensor]]:
    """``(layout, state dict)`` of a checkpoint file or dictionary, wrappers (``net.``, ``module.``,
    ``_orig_mod.``) stripped, the published names and shapes kept; errors as ``load_checkpoint``'s."""
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "<state dict>", path_or_state_dict
    else:
        source, raw = str(path_or_state_dict), read_checkpoint_file(Path(path_or_state_dict))
    layout, state = _unwrap(raw, source)
    return layout, {strip_wrappers(key): value for key, value in state.items()}


def checkpoint_metadata(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model section a cpl-convert file records under ``METADATA_KEY``, or None."""
    meta = obj.get(METADATA_KEY)
    if meta is None:
        return None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("model"), Mapping):
        raise ValueError(f"load_checkpoint: the checkpoint's {METADATA_KEY!r} entry is not "
                         f"{{'model': {{...}}}}: {type(meta).__name__}")
    return dict(meta["model"])


def _unwrap(obj: Mapping[str, Any], source: str) -> tuple[str, Mapping[str, torch.Tensor]]:
    """Find the model's state dict inside a checkpoint; returns ``(layout, state_dict)``."""
    if isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        # Lightning prefixes the wrapped network's attribute name ('net' in PromptIR's module).
        unwrapped = {key.removeprefix("net."): value for key, value in state.items()}
        return "lightning", _tensors(unwrapped, source)
    for name in ("params_ema", "params"):
        if isinstance(obj.get(name), Mapping):
            return f"basicsr:{name}", _tensors(obj[name], source)
    if isinstance(obj.get("model"), Mapping):
        return "cpl_fast", _tensors(obj["model"], source)
    if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return "plain", strip_lightning_prefix(obj)
    raise ValueError(f"load_checkpoint: {source} is not a recognised checkpoint: expected a state dict or a "
                     f"dictionary with 'state_dict', 'params_ema', 'params' or 'model'; top-level keys: "
                     f"{_summary(list(obj))}")


def _tensors(state: Mapping[str, Any], source: str) -> Mapping[str, torch.Tensor]:
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"load_checkpoint: {source}: entries that are not tensors: {_summary(bad)}")
    return state


def strip_lightning_prefix(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` without ``net.`` when every key has it: a LightningModule's own ``state_dict()`` saved
    bare (PromptIR's module holds the network as ``net``)."""
    if state and all(isinstance(key, str) and key.startswith("net.") for key in state):
        return {key.removeprefix("net."): value for key, value in state.items()}
    return state


def strip_wrappers(key: str) -> str:
    """``key`` without DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _summary(keys: list[str], limit: int = 12) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

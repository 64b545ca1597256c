"""A model's weights in the two published layouts: PromptIR's Lightning ``.ckpt``, CPL's BasicSR ``.pth``.

Lightning (``lightning_checkpoint``), the layout of PromptIR's release, which its ``test.py`` reads
with ``PromptIRModel().load_from_checkpoint(path)`` (Lightning 2.x: the checkpoint's version is read
for migrations, then a strict ``load_state_dict`` of ``state_dict`` into the module that holds
``PromptIR(decoder=True)`` as ``net``)::

    {"state_dict": {"net.<official key>": tensor, ...},     # 548 keys at the default architecture
     "epoch": int, "global_step": int, "pytorch-lightning_version": "2.0.1", "hyper_parameters": {},
     "cpl_fast": {"model": <config model section>}}

The keys are the official names in the official order (``promptir_state_dict.txt``): ours, the
prompt banks as ``(1, n, C, S, S)``, and the six 1x1 convolutions the official class builds but never
uses, written as zeros with the shapes that class gives them (they change no output; a strict load
needs them). ``2.0.1`` is the Lightning release PromptIR pins; no migration applies to a 2.x
checkpoint, so neither loops nor optimiser states are needed (the file restores a model, not a
training run). Only a dense ``SparsePromptIR`` is written: PromptIR's prompt block weights every
prompt by its softmax probability, so a top-k model in this layout would be run dense by PromptIR's
code, a different function; such a model is refused (``ConversionError``) and belongs in the BasicSR
layout. Selection biases of a dense model select nothing and are left out.

BasicSR (``basicsr_checkpoint``), the layout of CPL's release::

    {"params": {<key>: tensor}, "params_ema": {<key>: tensor}, "cpl_fast": {"model": ...}}

keys without prefix, prompt banks ``(1, n, C, S, S)`` as CPL's ``SparsePromptIR`` stores them (542 keys
at the default architecture, no unused convolutions). ``params_ema`` holds the EMA weights when
there are any, else the same weights as ``params``. Selection biases that are all zero are left out
(a router without them selects the same, and CPL's class has none); others are kept.

The ``cpl_fast`` entry records the model section (routing included, which the weights cannot tell);
the published code ignores it. Files are written atomically and never over an existing file unless
``force``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cpl_fast.models.checkpoint import METADATA_KEY, UNUSED_OFFICIAL_KEYS

FORMATS = ("lightning", "basicsr")
SUFFIXES = {".ckpt": "lightning", ".pth": "basicsr", ".pt": "basicsr"}
LIGHTNING_VERSION = "2.0.1"
LIGHTNING_PREFIX = "net."
# Top-level modules of the official PromptIR(decoder=True) in the order its state dict lists them.
OFFICIAL_ORDER = (
    "patch_embed", "prompt1", "prompt2", "prompt3", "chnl_reduce1", "chnl_reduce2", "chnl_reduce3",
    "reduce_noise_channel_1", "encoder_level1", "down1_2", "reduce_noise_channel_2", "encoder_level2",
    "down2_3", "reduce_noise_channel_3", "encoder_level3", "down3_4", "latent", "up4_3", "reduce_chan_level3",
    "noise_level3", "reduce_noise_level3", "decoder_level3", "up3_2", "reduce_chan_level2", "noise_level2",
    "reduce_noise_level2", "decoder_level2", "up2_1", "noise_level1", "reduce_noise_level1", "decoder_level1",
    "refinement", "output",
)


class ConversionError(ValueError):
    """The model cannot be written in the asked layout, or the output cannot be written; says why."""


@dataclass
class Converted:
    """A checkpoint dictionary ready to save, and what the conversion did."""

    checkpoint: dict[str, Any]
    layout: str                                       # lightning | basicsr
    keys: int                                         # tensors in the (first) state dict
    notes: list[str] = field(default_factory=list)


def output_format(path: str | os.PathLike, to: str | None) -> str:
    """``to`` when given, else the layout the file name implies (``.ckpt`` Lightning, ``.pth``/``.pt``
    BasicSR); ConversionError when neither says."""
    if to is not None:
        if to not in FORMATS:
            raise ConversionError(f"unknown output layout {to!r}; choose one of {', '.join(FORMATS)}")
        return to
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ConversionError(f"cannot tell the layout from the name {Path(path).name!r}: end it in .ckpt "
                              f"(Lightning) or .pth (BasicSR), or give --to {'|'.join(FORMATS)}")
    return SUFFIXES[suffix]


def unused_official_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the six never-used 1x1 convolutions as the official PromptIR builds them for ``dim``
    (``chnl_reduce*`` are fixed there; ``reduce_noise_channel_l`` maps ``2**(l-1) (dim + 64)`` channels
    to ``2**(l-1) dim``)."""
    shapes = {"chnl_reduce1.weight": (64, 64, 1, 1), "chnl_reduce2.weight": (128, 128, 1, 1),
              "chnl_reduce3.weight": (256, 320, 1, 1)}
    for level in (1, 2, 3):
        scale = 2 ** (level - 1)
        shapes[f"reduce_noise_channel_{level}.weight"] = (dim * scale, (dim + 64) * scale, 1, 1)
    assert set(shapes) == UNUSED_OFFICIAL_KEYS
    return shapes


def lightning_checkpoint(model: nn.Module, model_config: Mapping[str, Any], epoch: int = 0,
                         global_step: int = 0) -> Converted:
    """PromptIR's Lightning checkpoint of a dense ``SparsePromptIR`` (see the module docstring)."""
    from cpl_fast.models.promptir import SparsePromptIR

    if not isinstance(model, SparsePromptIR):
        raise ConversionError(f"the Lightning layout holds PromptIR, a SparsePromptIR; this model is a "
                              f"{type(model).__name__}: write the BasicSR layout (.pth) instead")
    if model.top_k is not None:
        raise ConversionError(
            f"the model routes sparsely (top-{model.top_k} of {model.num_prompts} prompts); PromptIR's "
            f"Lightning layout holds a dense PromptIR, whose prompt block mixes every prompt, so its code "
            f"would compute a different function with these weights: write the BasicSR layout (.pth, CPL's "
            f"release format) instead")
    notes = []
    state = _ours(model)
    biases = [key for key in state if key.endswith(".route_bias")]
    for key in biases:
        del state[key]
    if biases:
        notes.append("selection biases left out: a dense router does not select, so they change nothing")
    official = _published_prompts(state)
    for key, shape in unused_official_shapes(model.patch_embed.proj.weight.shape[0]).items():
        official[key] = torch.zeros(shape, dtype=model.output.weight.dtype)
    order = {name: i for i, name in enumerate(OFFICIAL_ORDER)}
    keys = sorted(official, key=lambda key: order.get(key.split(".", 1)[0], len(order)))
    from cpl_fast.models.infer import model_architecture, preset_architecture

    arch = model_architecture(model)
    differs = [name for name in arch.differences(preset_architecture("promptir")) if name != "route_bias"]
    if differs:
        more = ", ..." if len(differs) > 3 else ""
        notes.append(f"not PromptIR's default architecture ({arch.describe(differs[:3])}{more}): PromptIR's "
                     f"test script builds only the default and will not load this file; cpl_fast does")
    checkpoint = {
        "epoch": int(epoch), "global_step": int(global_step), "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": {LIGHTNING_PREFIX + key: official[key] for key in keys},
        "hyper_parameters": {},
        METADATA_KEY: {"model": _plain(model_config)},
    }
    return Converted(checkpoint, "lightning", len(keys), notes)


def basicsr_checkpoint(model: nn.Module, model_config: Mapping[str, Any],
                       ema: nn.Module | None = None) -> Converted:
    """CPL's BasicSR checkpoint: ``params`` from ``model``, ``params_ema`` from ``ema`` (else ``model``)."""
    from cpl_fast.models.promptir import SparsePromptIR

    notes = []
    if ema is None:
        notes.append("no EMA weights: params_ema holds the same weights as params")
    elif set(ema.state_dict()) != set(model.state_dict()):
        raise ConversionError("the EMA weights and the model weights have different keys")
    states = [_ours(model), _ours(ema) if ema is not None else None]
    biases = [key for key in states[0] if key.endswith(".route_bias")]
    if biases and all(not state[key].any() for state in states if state is not None for key in biases):
        for state in states:
            for key in biases if state is not None else ():
                del state[key]
        notes.append("zero selection biases left out (a router without them selects the same)")
    elif biases:
        notes.append("selection biases (route_bias) kept: CPL's published class has none and would need "
                     "strict=False, then select without them")
    if isinstance(model, SparsePromptIR):
        states = [None if state is None else _published_prompts(state) for state in states]
    params, params_ema = states[0], states[1] if states[1] is not None else states[0]
    checkpoint = {"params": params, "params_ema": params_ema, METADATA_KEY: {"model": _plain(model_config)}}
    return Converted(checkpoint, "basicsr", len(params), notes)


def save_converted(converted: Converted, path: str | os.PathLike, force: bool = False,
                   check: Callable[[Path], None] | None = None) -> Path:
    """Write ``converted.checkpoint`` to ``path`` atomically (``cpl_fast.atomic_files``); an existing file
    is replaced only with ``force`` (ConversionError otherwise). ``check(temporary file)`` runs before
    the file is moved into place: when it raises, nothing is written and a previous file stays."""
    from cpl_fast.atomic_files import atomic_path

    path = Path(path)
    refuse_existing(path, force)
    with atomic_path(path) as tmp:
        torch.save(converted.checkpoint, tmp)
        if check is not None:
            check(tmp)
    return path


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """ConversionError when ``path`` exists (a folder always; a file unless ``force``)."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"output {path} is a folder; give a file name")
    if path.exists() and not force:
        raise ConversionError(f"output {path} exists; --force replaces it")


def _ours(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def _published_prompts(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prompt banks ``(n, C, S, S)`` as the published ``(1, n, C, S, S)``."""
    return {key: value.unsqueeze(0) if key.endswith("prompt_param") and value.dim() == 4 else value
            for key, value in state.items()}


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model section with tuples as lists, so that ``torch.load(weights_only=True)`` reads it."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)

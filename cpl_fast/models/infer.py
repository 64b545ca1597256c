"""The architecture a state dict belongs to, read from its tensors' shapes.

A checkpoint without cpl_fast's config (PromptIR's Lightning ``.ckpt``, CPL's BasicSR ``.pth``, a bare
state dict) still says most of what its model is: ``infer_architecture`` reads, for ``SparsePromptIR``,
the width (``patch_embed``), the blocks per level and refinement blocks (the indices of each stage),
the heads (each stage's ``attn.temperature``), the FFN factor (``ffn.project_out``), the prompts
(``prompt{1,2,3}.prompt_param``: ``n``, channels, size) and whether the routers carry selection biases
(``route_bias``); for ``PromptNAFNet`` the width, levels, blocks and prompts likewise. The result is
checked by building the model on the meta device and comparing every key and shape, so an
architecture is only reported when the weights load into it strictly.

What the shapes cannot say: dense versus top-k routing (a router has the same parameters either
way; only selection biases, which exist for sparse routers alone, imply top-k, and never which k)
and ``renormalize``. Those are left to the caller (``sparse`` says what the weights imply).
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cpl_fast.models.checkpoint import UNUSED_OFFICIAL_KEYS, strip_lightning_prefix, strip_wrappers
from cpl_fast.models.registry import MODELS, PRESETS, preset_section

# Settings the shapes cannot decide: never compared, never read.
ROUTING_KWARGS = ("top_k", "renormalize")

# (constructor argument, how it reads in a message), in the order messages list them.
_FIELDS = {
    "SparsePromptIR": (
        ("dim", "dim"), ("num_blocks", "blocks per level"), ("num_refinement_blocks", "refinement blocks"),
        ("heads", "heads"), ("num_prompts", "prompts"), ("prompt_dims", "prompt dims"),
        ("prompt_sizes", "prompt sizes"), ("prompt_heads", "prompt heads"),
        ("ffn_expansion_factor", "FFN factor"), ("inp_channels", "input channels"),
        ("out_channels", "output channels"), ("route_bias", "selection biases")),
    "PromptNAFNet": (
        ("width", "width"), ("enc_blocks", "encoder blocks"), ("middle_blocks", "middle blocks"),
        ("dec_blocks", "decoder blocks"), ("num_prompts", "prompts"), ("prompt_dims", "prompt dims"),
        ("prompt_sizes", "prompt sizes"), ("inp_channels", "input channels"),
        ("out_channels", "output channels"), ("route_bias", "selection biases")),
}
# FFN factors tried first, so the common ones come back as written (2.66, not 127/48).
_FFN_CANDIDATES = (2.66, 2.0, 4.0, 3.0, 1.0)


class ArchitectureError(ValueError):
    """The state dict is not one of the architectures cpl_fast builds; the message says what is off."""


@dataclass(frozen=True)
class Architecture:
    """A registered model class and the constructor arguments its weights fix."""

    model_type: str                 # a name in cpl_fast.models.MODELS
    kwargs: dict[str, Any]          # constructor arguments read from the shapes (sequences as tuples)

    @property
    def sparse(self) -> bool | None:
        """True when the weights imply top-k routing (selection biases), None when they cannot say."""
        return True if self.kwargs.get("route_bias") else None

    @property
    def config(self) -> dict[str, Any]:
        """A ``build_model`` config for this architecture (routing left at the class default)."""
        return {"type": self.model_type, **self.kwargs}

    def describe(self, names: list[str] | None = None) -> str:
        """``dim 48, blocks per level [4, 6, 6, 8], ...`` (only ``names`` when given)."""
        parts = []
        for name, label in _FIELDS[self.model_type]:
            if names is not None and name not in names:
                continue
            value = self.kwargs[name]
            if name == "route_bias":
                if value or names is not None:
                    parts.append(f"{label} {'yes' if value else 'no'}")
                continue
            if names is None and name in ("inp_channels", "out_channels") and value == 3:
                continue
            parts.append(f"{label} {_text(value)}")
        return ", ".join(parts)

    def differences(self, other: Architecture) -> list[str]:
        """The constructor arguments that differ from ``other``'s, in message order."""
        if other.model_type != self.model_type:
            return ["model_type"]
        return [name for name, _ in _FIELDS[self.model_type] if self.kwargs[name] != other.kwargs[name]]


def compare_text(weights: Architecture, model: Architecture, model_name: str, limit: int = 4,
                 ignore: tuple[str, ...] = ()) -> str:
    """``the weights have dim 48, ...; preset 'tiny' has dim 8, ...``: the first ``limit`` differences
    (those in ``ignore`` left out)."""
    diff = [name for name in weights.differences(model) if name not in ignore]
    if diff == ["model_type"]:
        return f"the weights are a {weights.model_type}; {model_name} is a {model.model_type}"
    if not diff:
        return f"the weights and {model_name} have the same architecture"
    more = f" (and {len(diff) - limit} more differences)" if len(diff) > limit else ""
    return (f"the weights have {weights.describe(diff[:limit])}; {model_name} has "
            f"{model.describe(diff[:limit])}{more}")


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """The model class and constructor arguments that ``state_dict`` loads into strictly.

    Accepts our names and the published ones (``net.`` on every key, ``module.``/``_orig_mod.`` prefixes,
    5-D prompt banks, PromptIR's six unused convolutions). ArchitectureError when the keys are not those
    of a model cpl_fast builds, naming what is missing or inconsistent.
    """
    state = _normalised(state_dict)
    if "patch_embed.proj.weight" in state:
        arch = _promptir(state)
    elif "intro.weight" in state and any(key.startswith("prompts.") for key in state):
        arch = _nafnet(state)
    else:
        raise ArchitectureError("the weights are neither a SparsePromptIR (no patch_embed.proj.weight) nor "
                                f"a PromptNAFNet (no intro.weight); first keys: {', '.join(list(state)[:5])}")
    _check_by_building(arch, state)
    return arch


def resolved_preset(name: str) -> tuple[str, dict[str, Any]]:
    """``(model type, every constructor argument)`` a preset builds: the class defaults under it."""
    settings = dict(PRESETS[name])
    model_type = settings.pop("type", "SparsePromptIR")
    return model_type, {**_defaults(model_type), **{k: _tuple(v) for k, v in settings.items()}}


def preset_architecture(name: str) -> Architecture:
    """The architecture a preset builds (to describe a checkpoint against it)."""
    model_type, kwargs = resolved_preset(name)
    return Architecture(model_type, {key: kwargs[key] for key, _ in _FIELDS[model_type]})


def preset_top_k(name: str) -> int | None:
    return resolved_preset(name)[1].get("top_k")


def matching_presets(arch: Architecture) -> list[str]:
    """Presets building exactly this architecture (the number of prompts and biases aside: ``n`` and
    ``route_bias`` are settings of every preset)."""
    names = []
    for name in PRESETS:
        model_type, kwargs = resolved_preset(name)
        if model_type == arch.model_type and all(
                kwargs[key] == value for key, value in arch.kwargs.items()
                if key not in ("num_prompts", "route_bias")):
            names.append(name)
    return names


def model_section(arch: Architecture, top_k: int | None) -> dict[str, Any]:
    """A config ``model`` section (``preset``, ``k``, ``n``, ``overrides``) building ``arch`` with ``top_k``.

    The preset is the one of the class needing the fewest ``overrides`` (none when one builds the
    architecture), preferring one whose routing is ``top_k``.
    """
    def overrides_from(name: str) -> dict[str, Any]:
        base = resolved_preset(name)[1]
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in arch.kwargs.items()
                if key not in ("num_prompts", "route_bias") and base[key] != value}

    # The closest preset of the class: fewest arguments to override, then the same routing.
    names = [name for name in PRESETS if resolved_preset(name)[0] == arch.model_type]
    preset = min(names, key=lambda name: (len(overrides_from(name)), preset_top_k(name) != top_k))
    base = resolved_preset(preset)[1]
    overrides = overrides_from(preset)
    if arch.kwargs.get("route_bias"):
        overrides["route_bias"] = True
    k: Any = None
    if base.get("top_k") != top_k:
        k = "all" if top_k is None else top_k
    n = arch.kwargs["num_prompts"] if arch.kwargs["num_prompts"] != base["num_prompts"] else None
    return preset_section(preset, k, n, overrides)


def model_architecture(model: torch.nn.Module) -> Architecture:
    """The architecture of a built model (read from its own state dict, so it is described alike)."""
    return infer_architecture(model.state_dict())


# ---------------------------------------------------------------------------------------- readers

def _promptir(state: Mapping[str, torch.Tensor]) -> Architecture:
    embed = _get(state, "patch_embed.proj.weight", 4)
    dim, inp = int(embed.shape[0]), int(embed.shape[1])
    out = int(_get(state, "output.weight", 4).shape[0])
    stages = ["encoder_level1", "encoder_level2", "encoder_level3", "latent"]
    num_blocks = tuple(_count(state, stage) for stage in stages)
    for level, decoder in ((1, "decoder_level1"), (2, "decoder_level2"), (3, "decoder_level3")):
        if _count(state, decoder) != num_blocks[level - 1]:
            raise ArchitectureError(f"{decoder} has {_count(state, decoder)} blocks, encoder_level{level} "
                                    f"{num_blocks[level - 1]}: SparsePromptIR decodes each level with as "
                                    f"many blocks as it encodes")
    defaults = _defaults("SparsePromptIR")
    heads = tuple(_heads(state, stage, defaults["heads"][i]) for i, stage in enumerate(stages))
    banks = [_bank(state, f"prompt{i}") for i in (1, 2, 3)]
    counts = {bank.shape[0] for bank in banks}
    if len(counts) != 1:
        counts_text = ", ".join(str(int(b.shape[0])) for b in banks)
        raise ArchitectureError(f"the prompt levels have different numbers of prompts ({counts_text}); "
                                "SparsePromptIR uses one n")
    biases = [f"prompt{i}.route_bias" in state for i in (1, 2, 3)]
    if any(biases) and not all(biases):
        raise ArchitectureError("only some prompt levels have selection biases (route_bias)")
    kwargs = {
        "inp_channels": inp, "out_channels": out, "dim": dim, "num_blocks": num_blocks,
        "num_refinement_blocks": _count(state, "refinement"), "heads": heads,
        "ffn_expansion_factor": _ffn_factor(state),
        "num_prompts": int(banks[0].shape[0]),
        "prompt_dims": tuple(int(b.shape[1]) for b in banks),
        "prompt_sizes": tuple(int(b.shape[2]) for b in banks),
        "prompt_heads": _heads(state, "noise_level1", defaults["prompt_heads"], block=False),
        "route_bias": all(biases),
    }
    return Architecture("SparsePromptIR", kwargs)


def _nafnet(state: Mapping[str, torch.Tensor]) -> Architecture:
    intro = _get(state, "intro.weight", 4)
    levels = _count(state, "downs")
    if levels < 1:
        raise ArchitectureError("PromptNAFNet weights without downsampling convolutions (downs.0.weight)")
    banks = [_bank(state, f"prompts.{level}") for level in range(levels)]
    if len({int(b.shape[0]) for b in banks}) != 1:
        raise ArchitectureError("the prompt levels have different numbers of prompts; PromptNAFNet uses "
                                "one n")
    biases = [f"prompts.{level}.route_bias" in state for level in range(levels)]
    if any(biases) and not all(biases):
        raise ArchitectureError("only some prompt levels have selection biases (route_bias)")
    kwargs = {
        "inp_channels": int(intro.shape[1]), "out_channels": int(_get(state, "ending.weight", 4).shape[0]),
        "width": int(intro.shape[0]),
        "enc_blocks": tuple(_count(state, f"encoders.{level}") for level in range(levels)),
        "middle_blocks": _count(state, "middle"),
        "dec_blocks": tuple(_count(state, f"decoders.{level}") for level in range(levels)),
        "num_prompts": int(banks[0].shape[0]),
        "prompt_dims": tuple(int(b.shape[1]) for b in banks),
        "prompt_sizes": tuple(int(b.shape[2]) for b in banks),
        "route_bias": all(biases),
    }
    return Architecture("PromptNAFNet", kwargs)


def _normalised(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, value in strip_lightning_prefix(state_dict).items():
        if not isinstance(value, torch.Tensor):
            raise ArchitectureError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        key = strip_wrappers(key)
        if key in UNUSED_OFFICIAL_KEYS:
            continue
        state[key] = value
    if not state:
        raise ArchitectureError("the state dict holds no tensors")
    return state


def _get(state: Mapping[str, torch.Tensor], key: str, dims: int) -> torch.Tensor:
    if key not in state:
        raise ArchitectureError(f"missing {key}")
    if state[key].dim() != dims:
        raise ArchitectureError(f"{key} has shape {tuple(state[key].shape)}, expected {dims} dimensions")
    return state[key]


def _count(state: Mapping[str, torch.Tensor], stage: str) -> int:
    """The number of numbered children ``stage.0``, ``stage.1``, ... (contiguous from 0)."""
    pattern = re.compile(re.escape(stage) + r"\.(\d+)\.")
    found = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    if found and found != set(range(len(found))):
        raise ArchitectureError(f"{stage} has blocks {sorted(found)}: not numbered 0..{len(found) - 1}")
    return len(found)


def _heads(state: Mapping[str, torch.Tensor], stage: str, default: int, block: bool = True) -> int:
    key = f"{stage}.0.attn.temperature" if block else f"{stage}.attn.temperature"
    if key not in state:
        return default          # an empty stage has no attention: any head count builds it
    return int(_get(state, key, 3).shape[0])


def _bank(state: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    key = f"{prefix}.prompt_param"
    if key not in state:
        raise ArchitectureError(f"missing {key} (a prompt level)")
    bank = state[key]
    if bank.dim() == 5 and bank.shape[0] == 1:          # the published (1, n, C, S, S)
        bank = bank[0]
    if bank.dim() != 4 or bank.shape[2] != bank.shape[3]:
        raise ArchitectureError(f"{key} has shape {tuple(state[key].shape)}; expected (n, C, S, S) "
                                "or (1, n, C, S, S)")
    return bank


def _ffn_factor(state: Mapping[str, torch.Tensor]) -> float:
    pairs = {(int(v.shape[0]), int(v.shape[1])) for k, v in state.items()
             if k.endswith(".ffn.project_out.weight") and v.dim() == 4}
    if not pairs:
        return _defaults("SparsePromptIR")["ffn_expansion_factor"]
    dim, hidden = min(pairs)
    # hidden = int(dim * factor) for every block: a factor is right when it reproduces all of them.
    for factor in (*_FFN_CANDIDATES, hidden / dim, (hidden + 0.5) / dim):
        if all(int(d * factor) == h for d, h in pairs):
            return factor
    raise ArchitectureError(f"no FFN expansion factor gives the hidden widths {sorted(pairs)} "
                            "(hidden = int(dim * factor) in every block)")


def _check_by_building(arch: Architecture, state: Mapping[str, torch.Tensor]) -> None:
    """Build ``arch`` on the meta device (no memory, no init cost) and compare every key and shape."""
    try:
        with torch.device("meta"):
            model = MODELS[arch.model_type](**arch.kwargs)
    except (ValueError, TypeError) as err:
        raise ArchitectureError(f"the shapes read ({arch.describe()}) do not build a {arch.model_type}: "
                                f"{err}") from err
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    got = {key: tuple(value.shape[1:]) if key.endswith("prompt_param") and value.dim() == 5 else
           tuple(value.shape) for key, value in state.items()}
    missing = [key for key in expected if key not in got]
    unexpected = [key for key in got if key not in expected]
    wrong = [f"{key} {got[key]} (expected {expected[key]})" for key in expected
             if key in got and got[key] != expected[key]]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + \
               ([f"shapes {', '.join(wrong[:3])}"] if wrong else [])
    if problems:
        raise ArchitectureError(f"the weights look like a {arch.model_type} ({arch.describe()}) but do not "
                                f"fit one: {'; '.join(problems)}")


def _defaults(model_type: str) -> dict[str, Any]:
    signature = inspect.signature(MODELS[model_type].__init__)
    return {name: _tuple(p.default) for name, p in signature.parameters.items()
            if name != "self" and p.default is not inspect.Parameter.empty}


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)

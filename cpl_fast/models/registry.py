"""Model registry and presets, so a YAML config picks the architecture by ``type:`` or by name.

A config is a mapping with ``type`` (a registered class name; ``SparsePromptIR`` when absent),
optionally ``preset`` (a name in ``PRESETS`` whose settings the config then overrides), and the
class's keyword arguments.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch.nn as nn

ModelT = TypeVar("ModelT", bound=type[nn.Module])

MODELS: dict[str, type[nn.Module]] = {}

_TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 2, 2),
             prompt_dims=(8, 16, 32), prompt_sizes=(16, 8, 4), prompt_heads=2)

PRESETS: dict[str, dict[str, Any]] = {
    # PromptIR: every prompt weighted by its softmax probability.
    "promptir": {"type": "SparsePromptIR", "top_k": None},
    # CPL's SPM (the paper's setting): one expert per level, raw softmax weight.
    "cpl": {"type": "SparsePromptIR", "top_k": 1},
    # Small widths for tests and smoke runs.
    "tiny": {"type": "SparsePromptIR", **_TINY, "top_k": 1},
    "tiny_dense": {"type": "SparsePromptIR", **_TINY, "top_k": None},
}


def register_model(cls: ModelT | None = None, *,
                   name: str | None = None) -> ModelT | Callable[[ModelT], ModelT]:
    """Class decorator adding a model to ``MODELS`` (under its class name unless ``name`` is given)."""

    def add(model_cls: ModelT) -> ModelT:
        key = name or model_cls.__name__
        if key in MODELS and MODELS[key] is not model_cls:
            raise ValueError(f"register_model: a different model is already registered as '{key}'")
        MODELS[key] = model_cls
        return model_cls

    return add if cls is None else add(cls)


def build_model(name_or_config: str | Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Build a model from a preset name or a config mapping; keyword ``overrides`` win.

    ``build_model("cpl", num_prompts=10)``; ``build_model({"preset": "tiny", "top_k": None})``;
    ``build_model({"type": "SparsePromptIR", "dim": 32})``.
    """
    if isinstance(name_or_config, str):
        config: dict[str, Any] = {"preset": name_or_config}
    elif isinstance(name_or_config, Mapping):
        config = dict(name_or_config)
    else:
        raise TypeError("build_model: expected a preset name or a mapping, "
                        f"got {type(name_or_config).__name__}")
    config.update(overrides)
    preset = config.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"build_model: unknown preset '{preset}'; "
                             f"choose one of {', '.join(sorted(PRESETS))}")
        config = {**PRESETS[preset], **config}
    model_type = config.pop("type", "SparsePromptIR")
    if model_type not in MODELS:
        raise ValueError(f"build_model: unknown model type '{model_type}'; "
                         f"registered: {', '.join(sorted(MODELS))}")
    # YAML gives lists; the constructors take tuples.
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()}
    return MODELS[model_type](**kwargs)


# A run config's ``model`` section names the routing as ``k`` (None: the preset's; "all": dense) and
# the number of prompt experts as ``n`` (None: the preset's). This is the one place they become the
# constructors' ``top_k`` and ``num_prompts``.
_DEFAULT_TOP_K = 1
_DEFAULT_NUM_PROMPTS = 5


# Keys of a model section written before they were renamed (run folders and converted checkpoints of
# earlier versions hold them); read as the new names.
_OLD_SECTION_KEYS = {"k": "top_k", "n": "num_prompts"}


def preset_section(preset: str, top_k: int | str | None = None, num_prompts: int | None = None,
                  overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A config ``model`` section: the preset, and None for what the preset decides."""
    return {"preset": preset, "top_k": top_k, "num_prompts": num_prompts, "overrides": dict(overrides or {})}


def current_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` with today's keys: an earlier version's ``k`` / ``n`` are ``top_k`` / ``num_prompts``."""
    out = dict(section)
    for old, new in _OLD_SECTION_KEYS.items():
        if old in out:
            value = out.pop(old)
            if out.get(new) is not None and out[new] != value:
                raise ValueError(f"model section sets both {old}={value!r} and {new}={out[new]!r}; {old} is "
                                 f"the old name of {new}")
            if out.get(new) is None:
                out[new] = value
    return out


def section_routing(section: Mapping[str, Any]) -> tuple[int | None, int]:
    """``(top_k, num_prompts)`` a config ``model`` section builds (top_k None: dense).

    ValueError naming the preset when it is unknown.
    """
    section = current_section(section)
    preset = section.get("preset")
    if preset not in PRESETS:
        raise ValueError(f"model.preset {preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
    settings = PRESETS[preset]
    k = section.get("top_k")
    top_k = None if k == "all" else (settings.get("top_k", _DEFAULT_TOP_K) if k is None else k)
    n = section.get("num_prompts")
    return top_k, settings.get("num_prompts", _DEFAULT_NUM_PROMPTS) if n is None else n


def section_kwargs(section: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``build_model(section["preset"], ...)`` for a config ``model`` section."""
    section = current_section(section)
    kwargs = dict(section.get("overrides") or {})
    if section.get("top_k") is not None:
        kwargs["top_k"] = None if section["top_k"] == "all" else section["top_k"]
    if section.get("num_prompts") is not None:
        kwargs["num_prompts"] = section["num_prompts"]
    return kwargs


def model_from_config(section: Mapping[str, Any]) -> nn.Module:
    """The model of a config ``model`` section (``preset``, ``top_k``, ``num_prompts``, ``overrides``)."""
    return build_model(section["preset"], **section_kwargs(section))

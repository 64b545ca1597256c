"""A run's config from its layers: defaults <- CPR recipe <- preset <- YAML files <- ``--data`` <-
``--set``."""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cpl_fast.config.dotted import merge, parse_override, set_dotted
from cpl_fast.config.files import preset_path, read_yaml
from cpl_fast.config.schema import DEFAULTS, RECIPES, ConfigError
from cpl_fast.config.validation import router_balance, validate


def with_recipe(config: Mapping[str, Any], recipe: str) -> dict[str, Any]:
    """A copy of ``config`` whose CPR settings are those of ``recipe`` (``RECIPES``), the rest kept."""
    if recipe not in RECIPES:
        raise ConfigError(f"cpr.recipe must be one of {', '.join(RECIPES)}; got {recipe!r}")
    out = copy.deepcopy(dict(config))
    for key, value in RECIPES[recipe].items():
        section, name = key.split(".")
        out[section] = {**out[section], name: copy.deepcopy(value)}
    out["cpr"]["recipe"] = recipe
    return out




def normalise(config: dict[str, Any]) -> dict[str, Any]:
    """Settings implied by others: selection-bias balancing builds the model with ``route_bias``."""
    overrides = config["model"].setdefault("overrides", {})
    if isinstance(overrides, dict) and config["model"]["preset"] in _model_presets():
        if router_balance(config) == "bias":
            overrides["route_bias"] = True
        else:
            overrides.pop("route_bias", None)
    return config


def _model_presets() -> Mapping[str, Any]:
    from cpl_fast.models import PRESETS

    return PRESETS


def load_config(preset: str | None = None, files: Sequence[str | Path] = (),
                overrides: Sequence[str] = (), data_root: str | None = None) -> dict[str, Any]:
    """Defaults <- CPR recipe <- preset <- YAML files <- ``--data`` <- ``--set`` overrides; validated.

    The recipe is read from the merged result (wherever ``cpr.recipe`` was set), and its bundle is
    applied under every explicit setting, so ``--set cpr.alpha=...`` still wins over it.
    """
    layers: list[Mapping[str, Any]] = []
    if preset is not None:
        layers.append(read_yaml(preset_path(preset)))
    layers.extend(read_yaml(path) for path in files)
    parsed = [parse_override(text) for text in overrides]

    def build(base: dict[str, Any]) -> dict[str, Any]:
        config = base
        for layer in layers:
            config = merge(config, layer)
        if data_root is not None:
            config["data"]["root"] = str(data_root)
        for key, value in parsed:
            set_dotted(config, key, value)
        return config

    recipe = build(copy.deepcopy(DEFAULTS))["cpr"]["recipe"]
    config = normalise(build(with_recipe(DEFAULTS, recipe)))
    validate(config)
    return config


def apply_overrides(config: Mapping[str, Any], dotted: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``{"model.preset": "tiny_dense", ...}`` applied and validated.

    A ``cpr.recipe`` among them first replaces the CPR settings with that recipe's bundle.
    """
    out = copy.deepcopy(dict(config))
    if "cpr.recipe" in dotted:
        out = with_recipe(out, dotted["cpr.recipe"])
    for key, value in dotted.items():
        set_dotted(out, key, value)
    validate(normalise(out))
    return out


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run folder's ``config.yaml``, with the defaults of settings added after the run was made (the
    file holds every setting of its time, so nothing else changes)."""
    return merge(DEFAULTS, read_yaml(path))

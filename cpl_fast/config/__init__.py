"""cpl_fast.config: run configurations, shared by training, evaluation and export.

A config is a nested mapping (``as_settings`` gives it as typed sections). Every key has a default in
``DEFAULTS`` (:mod:`cpl_fast.config.schema`:
the paper's recipe, Section IV-B: Adam 2e-4, batch 8, 128 crops with flips/rotations, alpha 0.01, k 1,
m 4, n 5, frozen VGG19, PromptIR's warm-up + cosine schedule); a preset YAML in ``cpl_fast/configs``
overrides some of them, a user YAML overrides the preset, ``--set`` overrides win last. Any key not in
``DEFAULTS`` is an error naming it (typos must not silently train the default). Values given on the
command line are parsed as YAML scalars (``--set optim.lr=1e-3`` is a float, ``model.top_k=null`` is None)
so they get the same types as in a file.

A setting that was renamed (``RENAMED``: ``model.k`` is ``model.top_k``) is still read under its old
name, with a DeprecationWarning.

``validate`` checks types and cross-setting constraints (``top_k <= num_prompts``, ``m <= n - 1`` for
``mismatched_experts``, AMP only on GPUs, a data root for file layouts) and raises ``ConfigError``
(a ``ValueError``) with a message naming the setting.

* ``schema``: the settings, their defaults and documentation, the CPR recipes, the presets;
* ``files``: YAML reading and writing; ``dotted``: ``a.b`` names over nested configs;
* ``loading``: the layers merged into one config; ``validation``: the checks; ``doc``: docs/CONFIG.md.
"""
from cpl_fast.config.dotted import current_name, flat_dotted, get, merge, parse_override, set_dotted
from cpl_fast.config.files import dump_yaml, preset_path, read_yaml, yaml_load
from cpl_fast.config.loading import apply_overrides, load_config, normalise, read_run_config, with_recipe
from cpl_fast.config.schema import (
    AMP_MODES,
    DEFAULTS,
    FREE_MAPPINGS,
    OBJECTIVES,
    PRESET_NAMES,
    RECIPES,
    RENAMED,
    ConfigError,
    Settings,
    as_settings,
)
from cpl_fast.config.validation import cuda_requested, model_k_n, registry_choices, router_balance, validate

__all__ = [
    "AMP_MODES", "DEFAULTS", "FREE_MAPPINGS", "OBJECTIVES", "PRESET_NAMES", "RECIPES", "RENAMED",
    "ConfigError", "Settings", "apply_overrides", "as_settings", "cuda_requested", "current_name",
    "dump_yaml", "flat_dotted", "get", "load_config", "merge", "model_k_n", "normalise", "parse_override",
    "preset_path", "read_run_config", "read_yaml", "registry_choices", "router_balance", "set_dotted",
    "validate", "with_recipe", "yaml_load",
]

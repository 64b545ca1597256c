"""Training configuration: YAML presets, ``--set key=value`` overrides, validation.

A config is a nested mapping. Every key has a default in ``DEFAULTS`` (the paper's recipe,
Section IV-B: Adam 2e-4, batch 8, 128 crops with flips/rotations, alpha 0.01, k 1, m 4, n 5, frozen
VGG19, PromptIR's warm-up + cosine schedule); a preset YAML in ``cpl_fast/configs`` overrides some
of them, a user YAML overrides the preset, ``--set`` overrides win last. Any key not in
``DEFAULTS`` is an error naming it (typos must not silently train the default). Values given on
the command line are parsed as YAML scalars (``--set optim.lr=1e-3`` is a float, ``model.k=null``
is None) so they get the same types as in a file.

``validate`` checks types and cross-setting constraints (``k <= n``, ``m <= n - 1`` for
``mismatched_experts``, AMP only on GPUs, a data root for file layouts) and raises ``ConfigError``
(a ``ValueError``) with a message naming the setting.
"""
from __future__ import annotations

import copy
import importlib.resources
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

OBJECTIVES = ("literal", "loop", "fast", "l1", "auto")
SAMPLER_NAMES = ("mismatched_experts", "other_task")
CPR_FORMS = ("difference", "ratio", "hinge", "logistic")
CPR_DISTANCES = ("l2", "l1")
NEG_GRAD_MODES = ("all", "no_bank", "prompts", "none")
ROUTER_BALANCE = ("auto", "none", "aux_loss", "bias")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("warmup_cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
PRECISIONS = ("float32", "float64")
CPU_ALLOCATORS = ("caching", "system")
FEATURE_NAMES = ("vgg19", "efficientnet_lite0", "random_vgg19")
# "embedded": the built-in three-task set; "clean": a folder of clean images degraded on the fly
# (the seven-task setting); the rest are cpl_fast.data layouts.
DATA_LAYOUTS = ("embedded", "clean", "promptir3", "promptir5", "allweather", "cdd11", "weatherbench",
                "paired")

# Every setting, with the paper's recipe as default. ``None`` means "not set" where noted.
DEFAULTS: dict[str, Any] = {
    "name": "run",                 # the run folder is runs/<name>-<timestamp> unless run.dir is set
    "seed": 0,                     # seeds torch, numpy, Python, the data order and the negatives
    "device": "auto",              # auto (cuda when available) | cpu | cuda | cuda:N
    "precision": "float32",        # parameter dtype: float32, or float64 for exactness checks
    "amp": "none",                 # none | bf16 | fp16 (GPU only)
    "threads": None,               # torch.set_num_threads; None leaves torch's default
    "objective": "loop",           # literal | loop | fast | l1 | auto (fast if available, else loop)
    "model": {
        "preset": "cpl",           # a cpl_fast.models preset (tiny, tiny_dense, cpl, promptir)
        "k": None,                 # top-k experts; None keeps the preset's; "all" = dense
        "n": None,                 # number of prompt experts; None keeps the preset's
        "overrides": {},           # any other constructor argument of the model
    },
    "cpr": {
        # A named bundle of the settings below (see RECIPES); settings given explicitly win over it.
        "recipe": "stable",
        "alpha": 0.01,             # weight of the CPR term (fixed, or the start before calibration)
        "alpha_relative": 0.1,     # None: alpha fixed; r: alpha set at the first CPR step so that
                                   # alpha * L_pos = r * L1 there (the feature extractor's scale)
        "m": 4,                    # negatives per sample
        "sampler": "mismatched_experts",  # negatives: mismatched_experts (other experts of this
                                          # image, the paper) | other_task (other tasks' routings)
        "memory_size": 16,         # other_task: routings remembered per task
        "form": "hinge",           # difference (paper) | ratio | hinge | logistic
        "distance": "l2",          # feature distance: l2 (mean squared, paper) | l1 (mean absolute)
        "anchor_grad": True,       # L_neg also moves the positive I+ (paper: yes)
        "neg_grad": "all",         # what the negatives' gradient trains: all | no_bank | prompts | none
        "margin": 1.0,             # hinge: negatives pushed until L_neg >= margin * L_pos
        "tau": None,               # logistic: temperature in L_pos units (None: L_pos of the first batch)
        "warmup_steps": 0,         # plain L1 for this many steps before CPR starts
        "ramp_steps": 0,           # then alpha rises linearly from 0 over this many steps
        "features": "vgg19",       # frozen feature extractor
        "feature_options": {},     # keyword arguments of the extractor (weights, layers)
        "neg_chunk": None,         # objective fast: negatives decoded per pass (None: all in one pass)
        "negatives_per_step": None,  # objective fast: decode r of the m negatives per step, drawn
                                     # uniformly (None: all m); the difference form's expectation is unchanged
    },
    "router": {
        "balance": "auto",         # auto (bias for sparse routing, none for dense) | none | aux_loss
                                   # (Switch-style load-balancing term) | bias (selection-only expert
                                   # biases nudged from usage, DeepSeek-V3 style); set by the recipe
        "aux_weight": 0.01,        # aux_loss: weight of n * sum_i f_i P_i per prompt level
        "bias_rate": 0.001,        # bias: step of each expert's bias per optimiser step
    },
    "health": {
        "grad_ratio_every": 50,    # steps between measurements of |grad CPR| / |grad L1| (0: never)
        "warn": True,              # warn when routing collapses or the prompt gap grows large
    },
    "optim": {
        "name": "adam",            # adam | adamw
        "lr": 2.0e-4,              # base learning rate (the schedule multiplies it)
        "betas": [0.9, 0.999],     # Adam's moment decays
        "weight_decay": 0.0,       # L2 (adam) or decoupled (adamw) weight decay
        "grad_clip": None,         # max gradient norm; None = no clipping
        "accumulate": 1,           # micro-batches per optimiser step
    },
    "schedule": {
        "name": "warmup_cosine",   # PromptIR's linear warm-up then cosine decay to min_lr
        "warmup_epochs": 15,       # of schedule_epochs; converted to iterations
        "schedule_epochs": 150,    # the recipe's length the warm-up fraction refers to
        "min_lr": 0.0,             # the learning rate the cosine ends at
    },
    "data": {
        "layout": "promptir3",     # embedded | clean | promptir3 | promptir5 | allweather | cdd11 |
                                   # weatherbench | paired (see cpl-data verify)
        "root": None,              # data root (--data ROOT); required for file layouts
        "train_split": None,       # None: the layout's training split
        "test_split": None,        # None: the layout's test split (where it has one)
        "test_root": None,         # clean / paired / weatherbench: a separate test folder
        "tasks": ["sr", "blur", "noise", "jpeg", "rain", "haze", "dark"],  # clean layout only
        "crop": 128,               # training crop side in pixels
        "batch": 8,                # per process
        "augment": True,           # flips and rotations
        "balanced": True,          # same number of samples per task in each epoch
        "samples_per_epoch": None,  # None: the training set's size
        "num_workers": 4,          # DataLoader worker processes (0: load in the training process)
        "skip_unreadable": False,  # true: a sample whose image cannot be read is skipped (warned, counted)
    },
    "train": {
        "epochs": 150,             # passes over samples_per_epoch (unless iterations is set)
        "iterations": None,        # optimiser steps; overrides epochs when set
        "log_every": 10,           # steps between log lines (train.log; the console without a bar)
        "cpu_allocator": "caching",  # CPU runs: caching (cpl_fast.memory) | system
    },
    "checkpoint": {
        "every": 1000,             # optimiser steps between checkpoints (and one at the end)
        "keep": 3,                 # most recent checkpoints kept
        "keep_best": False,        # with eval.every: the best average PSNR so far in checkpoints/best
    },
    "ema": {
        "enabled": False,          # keep an exponential moving average of the weights (evaluated)
        "decay": 0.999,            # EMA decay per optimiser step
    },
    "logging": {
        "progress": True,          # tqdm bar on rank 0 when the output is a terminal
        "tensorboard": True,       # TensorBoard event files in RUN/tensorboard
        "wandb": False,            # Weights & Biases (pip install wandb)
        "wandb_project": "cpl_fast",  # the W&B project of the run
    },
    "eval": {
        "before_after": False,     # evaluate on the test split before and after training
        "max_images": None,        # cap per run (None: all)
        "every": 0,                # validate on the test split every N steps and at the end (0: never)
        "images_per_task": None,   # validation: the first N test images of each task (None: all)
        "sample_images": 3,        # validation: restored images sent to TensorBoard / W&B (one per task)
    },
    "report": {
        "enabled": False,          # markdown + figures in the run folder
    },
    # Variants trained the same way (same data, steps, seed) for comparison: name -> dotted overrides.
    "baselines": {},
    "run": {
        "dir": None,               # None: runs/<name>-<timestamp>
        "root": "runs",            # where new run folders are made
    },
}

# Named CPR settings. "paper": Algorithm 1 as published (the values of DEFAULTS).
# Named bundles of CPR (and router) settings; each names every setting it decides, so switching
# recipes never leaves one of the other recipe's values behind. Evidence: bench/results/cpr_study.md.
_PAPER = {"cpr.alpha": 0.01, "cpr.alpha_relative": None, "cpr.form": "difference", "cpr.distance": "l2",
          "cpr.anchor_grad": True, "cpr.neg_grad": "all", "cpr.margin": 1.0, "cpr.tau": None,
          "cpr.warmup_steps": 0, "cpr.ramp_steps": 0, "router.balance": "none"}
RECIPES: dict[str, dict[str, Any]] = {
    # Algorithm 1 as published: unbounded difference, alpha 0.01, everything trained by L_neg, no
    # router balancing. On the CPR study it degrades the model (artefacts, collapse of quality).
    "paper": _PAPER,
    # The default: a hinge (negatives pushed only until L_neg >= margin * L_pos), alpha set from the
    # extractor's scale (alpha * L_pos = 0.1 * L1 at the first CPR step) and selection-bias balancing
    # of sparse routers (no task information without it).
    "stable": {**_PAPER, "cpr.alpha_relative": 0.1, "cpr.form": "hinge", "router.balance": "auto"},
}

# Mappings whose keys are free (not checked against DEFAULTS).
FREE_MAPPINGS = {"model.overrides", "cpr.feature_options", "baselines"}

PRESET_NAMES = ("three_task", "five_task", "seven_task", "all_weather", "cdd11", "weatherbench", "demo",
                "repro", "cpr_study")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the setting."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float (YAML 1.2) rather than a string (YAML 1.1)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML with the loader of this module (safe; ``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# --------------------------------------------------------------------------------------- loading

def preset_path(name: str) -> Path:
    """The YAML file of a preset shipped in ``cpl_fast.configs``."""
    if name not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return Path(str(importlib.resources.files("cpl_fast.configs").joinpath(f"{name}.yaml")))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file -> ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return dict(data)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")) or any(c.isspace() for c in key):
        raise ConfigError(f"bad override {text!r}: the key must be dotted names like optim.lr")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad override {text!r}: the value is not valid YAML ({exc})") from exc
    return key, value


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["a"]["b"] = value`` for ``key = "a.b"`` (checked against ``DEFAULTS``)."""
    parts = key.split(".")
    node, schema, path = config, DEFAULTS, ""
    for i, part in enumerate(parts[:-1]):
        path = f"{path}.{part}" if path else part
        if path in FREE_MAPPINGS:
            node = node.setdefault(part, {})
            # Below a free mapping, nested names are created as needed (baselines.dense.model.preset).
            for sub in parts[i + 1:-1]:
                node = node.setdefault(sub, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"cannot set {key}: {sub} is not a mapping")
            node[parts[-1]] = value
            return
        if not isinstance(schema, Mapping) or part not in schema or not isinstance(schema[part], Mapping):
            raise ConfigError(f"unknown setting {key!r}: {path!r} is not a section "
                              f"(sections: {_sections(schema)})")
        schema = schema[part]
        node = node.setdefault(part, {})
    last = parts[-1]
    full = f"{path}.{last}" if path else last
    if not isinstance(schema, Mapping) or last not in schema:
        raise ConfigError(f"unknown setting {full!r}{_suggest(last, schema)}")
    node[last] = value


def _sections(schema: Mapping[str, Any]) -> str:
    return ", ".join(k for k, v in schema.items() if isinstance(v, Mapping))


def _suggest(name: str, schema: Any) -> str:
    import difflib

    if not isinstance(schema, Mapping):
        return ""
    close = difflib.get_close_matches(name, list(schema), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known here: {', '.join(schema)}"


def merge(base: Mapping[str, Any], update: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """Deep merge ``update`` into a copy of ``base``; keys outside ``DEFAULTS`` raise ConfigError."""
    out = copy.deepcopy(dict(base))
    schema = _schema_at(path)
    for key, value in update.items():
        full = f"{path}.{key}" if path else str(key)
        if path in FREE_MAPPINGS:
            out[key] = copy.deepcopy(value)
            continue
        if key not in schema:
            raise ConfigError(f"unknown setting {full!r}{_suggest(str(key), schema)}")
        if isinstance(schema[key], Mapping) and full not in FREE_MAPPINGS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"setting {full!r} must be a mapping, got {value!r}")
            out[key] = merge(out.get(key, {}), value, full)
        elif full in FREE_MAPPINGS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"setting {full!r} must be a mapping, got {value!r}")
            out[key] = merge(out.get(key, {}), value, full)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _schema_at(path: str) -> Mapping[str, Any]:
    node: Any = DEFAULTS
    for part in path.split(".") if path else []:
        node = node[part] if isinstance(node, Mapping) and part in node else {}
    return node if isinstance(node, Mapping) else {}


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


def router_balance(config: Mapping[str, Any]) -> str:
    """The effective ``router.balance``: ``auto`` is ``bias`` for sparse routing, ``none`` for dense."""
    balance = config["router"]["balance"]
    if balance == "auto":
        k, _ = model_k_n(config)
        return "none" if k is None else "bias"
    return balance


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


# ------------------------------------------------------------------------------------ validation

def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(config: Mapping[str, Any], key: str, choices: Sequence[str]) -> None:
    value = get(config, key)
    _need(value in choices, f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(config: Mapping[str, Any], key: str, minimum: int, optional: bool = False) -> None:
    value = get(config, key)
    if optional and value is None:
        return
    _need(_is_int(value) and value >= minimum, f"{key} must be an integer >= {minimum}; got {value!r}")


def _check_number(config: Mapping[str, Any], key: str, low: float, high: float | None = None,
                  optional: bool = False) -> None:
    value = get(config, key)
    if optional and value is None:
        return
    ok = _is_number(value) and math.isfinite(value) and value >= low and (high is None or value <= high)
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low} (finite)"
    _need(ok, f"{key} must be a number {bounds}; got {value!r}")


def get(config: Mapping[str, Any], key: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``."""
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def cuda_requested(config: Mapping[str, Any]) -> bool:
    """Whether the configured device is a GPU (``auto`` resolves to one when CUDA is available)."""
    device = str(config["device"])
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def validate(config: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first invalid setting; needs no data and no GPU."""
    merge(DEFAULTS, config)  # unknown keys anywhere
    _need(isinstance(config["name"], str) and config["name"], "name must be a non-empty string")
    _check_int(config, "seed", 0)
    _need(config["seed"] < 2 ** 32, f"seed must be an integer in [0, 2**32 - 1] (numpy's range); "
                                    f"got {config['seed']!r}")
    _need(config["device"] in ("auto", "cpu", "cuda") or str(config["device"]).startswith("cuda:"),
          f"device must be auto, cpu, cuda or cuda:N; got {config['device']!r}")
    _check_choice(config, "precision", PRECISIONS)
    _check_choice(config, "amp", AMP_MODES)
    if config["amp"] != "none" and not cuda_requested(config):
        raise ConfigError(f"amp={config['amp']} needs a CUDA GPU, but device={config['device']!r} resolves "
                          f"to the CPU; use amp=none on the CPU")
    _need(config["amp"] == "none" or config["precision"] == "float32",
          f"amp={config['amp']} mixes precisions of float32 weights; it cannot be combined with precision="
          f"{config['precision']}")
    _check_int(config, "threads", 1, optional=True)
    _check_choice(config, "objective", OBJECTIVES)

    model = config["model"]
    _need(isinstance(model["preset"], str), f"model.preset must be a preset name; got {model['preset']!r}")
    _need(model["k"] is None or model["k"] == "all" or (_is_int(model["k"]) and model["k"] >= 1),
          f"model.k must be null (the preset's), 'all' (dense) or an integer >= 1; got {model['k']!r}")
    _check_int(config, "model.n", 1, optional=True)
    _need(isinstance(model["overrides"], Mapping), "model.overrides must be a mapping")
    for key in ("top_k", "num_prompts"):
        _need(key not in model["overrides"],
              f"model.overrides.{key}: set model.{'k' if key == 'top_k' else 'n'} instead")
    k, n = model_k_n(config)
    if k is not None and n is not None:
        _need(k <= n, f"model.k={k} must not exceed model.n={n} (top-k of n experts)")

    cpr = config["cpr"]
    _need(cpr["recipe"] in RECIPES, f"cpr.recipe must be one of {', '.join(RECIPES)}; got {cpr['recipe']!r}")
    _check_number(config, "cpr.alpha", 0.0)
    _check_number(config, "cpr.alpha_relative", 0.0, optional=True)
    _need(cpr["alpha_relative"] is None or cpr["alpha_relative"] > 0,
          f"cpr.alpha_relative must be null (fixed alpha) or a positive fraction of L1; got "
          f"{cpr['alpha_relative']!r}")
    _check_choice(config, "cpr.distance", CPR_DISTANCES)
    _need(isinstance(cpr["anchor_grad"], bool), f"cpr.anchor_grad must be true or false; got "
                                                f"{cpr['anchor_grad']!r}")
    _check_choice(config, "cpr.neg_grad", NEG_GRAD_MODES)
    _check_number(config, "cpr.margin", 0.0)
    _need(cpr["margin"] > 0, f"cpr.margin must be positive; got {cpr['margin']!r}")
    _check_number(config, "cpr.tau", 0.0, optional=True)
    _need(cpr["tau"] is None or cpr["tau"] > 0, f"cpr.tau must be null (calibrated) or positive; got "
                                                f"{cpr['tau']!r}")
    _check_int(config, "cpr.warmup_steps", 0)
    _check_int(config, "cpr.ramp_steps", 0)
    _check_int(config, "cpr.m", 1)
    _check_choice(config, "cpr.sampler", SAMPLER_NAMES)
    _check_int(config, "cpr.memory_size", 1)
    _check_choice(config, "cpr.form", CPR_FORMS)
    _check_choice(config, "cpr.features", FEATURE_NAMES)
    _need(isinstance(cpr["feature_options"], Mapping), "cpr.feature_options must be a mapping")
    _check_int(config, "cpr.neg_chunk", 1, optional=True)
    _need(cpr["neg_chunk"] is None or config["objective"] in ("fast", "auto"),
          f"cpr.neg_chunk chunks the negatives of objective fast; objective {config['objective']!r} "
          f"does not take it")
    _check_int(config, "cpr.negatives_per_step", 1, optional=True)
    _need(cpr["negatives_per_step"] is None or config["objective"] in ("fast", "auto"),
          f"cpr.negatives_per_step subsamples the negatives of objective fast; objective "
          f"{config['objective']!r} does not take it")
    _need(cpr["negatives_per_step"] is None or cpr["negatives_per_step"] <= cpr["m"],
          f"cpr.negatives_per_step={cpr['negatives_per_step']} must be <= cpr.m={cpr['m']}")
    if config["objective"] != "l1" and cpr["sampler"] == "mismatched_experts" and n is not None:
        _need(cpr["m"] <= n - 1, f"cpr.m={cpr['m']} negatives with sampler mismatched_experts need "
                                 f"m <= n - 1 = {n - 1} (each negative uses a different other expert)")

    _check_choice(config, "router.balance", ROUTER_BALANCE)
    _check_number(config, "router.aux_weight", 0.0)
    _check_number(config, "router.bias_rate", 0.0)
    if config["router"]["balance"] not in ("none", "auto"):
        _need(k is not None, f"router.balance={config['router']['balance']} balances sparse routing; the "
                             f"model is dense (model.k=all or a dense preset)")
    _check_int(config, "health.grad_ratio_every", 0)
    _need(isinstance(config["health"]["warn"], bool), "health.warn must be true or false")

    _check_choice(config, "optim.name", OPTIMIZERS)
    _check_number(config, "optim.lr", 0.0)
    betas = config["optim"]["betas"]
    _need(isinstance(betas, (list, tuple)) and len(betas) == 2
          and all(_is_number(b) and 0 <= b < 1 for b in betas),
          f"optim.betas must be two numbers in [0, 1); got {betas!r}")
    _check_number(config, "optim.weight_decay", 0.0)
    _check_number(config, "optim.grad_clip", 0.0, optional=True)
    _check_int(config, "optim.accumulate", 1)

    _check_choice(config, "schedule.name", SCHEDULES)
    _check_number(config, "schedule.warmup_epochs", 0.0)
    _check_number(config, "schedule.schedule_epochs", 1e-12)
    _need(config["schedule"]["warmup_epochs"] < config["schedule"]["schedule_epochs"],
          "schedule.warmup_epochs must be smaller than schedule.schedule_epochs")
    _check_number(config, "schedule.min_lr", 0.0)

    data = config["data"]
    _check_choice(config, "data.layout", DATA_LAYOUTS)
    for key in ("root", "train_split", "test_split", "test_root"):
        _need(data[key] is None or isinstance(data[key], str), f"data.{key} must be a string or null")
    if data["layout"] != "embedded":
        _need(data["root"] is not None, f"data layout {data['layout']!r} needs a data root: pass --data ROOT "
                                        f"or --set data.root=ROOT")
    _need(isinstance(data["tasks"], list) and data["tasks"], "data.tasks must be a non-empty list")
    _check_int(config, "data.crop", 8)
    _need(data["crop"] % 8 == 0, f"data.crop must be a multiple of 8 (the model's size multiple); "
                                 f"got {data['crop']}")
    _check_int(config, "data.batch", 1)
    _need(isinstance(data["augment"], bool), "data.augment must be true or false")
    _need(isinstance(data["balanced"], bool), "data.balanced must be true or false")
    _check_int(config, "data.samples_per_epoch", 1, optional=True)
    _check_int(config, "data.num_workers", 0)
    _need(isinstance(data["skip_unreadable"], bool), "data.skip_unreadable must be true or false")

    _check_int(config, "train.epochs", 1)
    _check_int(config, "train.iterations", 1, optional=True)
    _check_int(config, "train.log_every", 1)
    _check_choice(config, "train.cpu_allocator", CPU_ALLOCATORS)
    _check_int(config, "checkpoint.every", 1)
    _check_int(config, "checkpoint.keep", 1)
    _need(isinstance(config["ema"]["enabled"], bool), "ema.enabled must be true or false")
    _check_number(config, "ema.decay", 0.0, 1.0)
    for key in ("progress", "tensorboard", "wandb"):
        _need(isinstance(config["logging"][key], bool), f"logging.{key} must be true or false")
    _need(isinstance(config["eval"]["before_after"], bool), "eval.before_after must be true or false")
    _check_int(config, "eval.max_images", 1, optional=True)
    _check_int(config, "eval.every", 0)
    _check_int(config, "eval.images_per_task", 1, optional=True)
    _check_int(config, "eval.sample_images", 0)
    _need(isinstance(config["checkpoint"]["keep_best"], bool), "checkpoint.keep_best must be true or false")
    _need(not config["checkpoint"]["keep_best"] or config["eval"]["every"] > 0,
          "checkpoint.keep_best keeps the best validation: it needs eval.every > 0 (validate every N steps)")
    _need(isinstance(config["report"]["enabled"], bool), "report.enabled must be true or false")
    _need(isinstance(config["baselines"], Mapping), "baselines must map names to overrides")
    for name, dotted in config["baselines"].items():
        _need(isinstance(dotted, Mapping), f"baselines.{name} must be a mapping of settings")
        _need("baselines" not in dotted, f"baselines.{name} cannot itself have baselines")
    _need(config["run"]["dir"] is None or isinstance(config["run"]["dir"], str), "run.dir must be a string")
    _need(isinstance(config["run"]["root"], str), "run.root must be a string")


def model_k_n(config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """Effective ``(k, n)``: explicit settings, else the model preset's (k None = dense)."""
    from cpl_fast.models import PRESETS

    model = config["model"]
    preset = PRESETS.get(model["preset"], {})
    if model["preset"] not in PRESETS:
        raise ConfigError(f"model.preset {model['preset']!r} is unknown; "
                          f"choose one of {', '.join(sorted(PRESETS))}")
    n = model["n"] if model["n"] is not None else preset.get("num_prompts", 5)
    if model["k"] == "all":
        k = None
    elif model["k"] is not None:
        k = model["k"]
    else:
        k = preset.get("top_k", 1)
    return k, n


def flat_dotted(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten nested baseline settings: ``{"model": {"preset": "x"}}`` -> ``{"model.preset": "x"}``.

    Free mappings (``model.overrides``) are kept whole.
    """
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            full = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) and full not in FREE_MAPPINGS and full in _mapping_keys():
                walk(value, full)
            else:
                out[full] = value

    walk(dotted, "")
    return out


def _mapping_keys() -> set[str]:
    keys: set[str] = set()

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            full = f"{prefix}.{key}" if prefix else key
            if isinstance(value, Mapping):
                keys.add(full)
                walk(value, full)

    walk(DEFAULTS, "")
    return keys


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run folder's ``config.yaml``, with the defaults of settings added after the run was made (the
    file holds every setting of its time, so nothing else changes)."""
    return merge(DEFAULTS, read_yaml(path))


def dump_yaml(config: Mapping[str, Any], path: str | Path) -> None:
    """Write a config as YAML (what a run folder keeps, and what ``--resume`` reads back)."""
    from cpl_fast.data.io import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(dict(config), sort_keys=False).encode("utf-8"))

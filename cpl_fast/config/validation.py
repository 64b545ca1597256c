"""``validate``: types, ranges and cross-setting constraints, each failure a ConfigError naming the setting.

Choices owned by a registry of a lower layer (model presets, CPR forms and distances, feature
networks, negative samplers, data layouts) are read from that registry, so a new entry there is a
valid setting here without a second list to keep in step.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cpl_fast.config.dotted import get, merge
from cpl_fast.config.schema import (
    AMP_MODES,
    CPU_ALLOCATORS,
    DEFAULTS,
    NEG_GRAD_MODES,
    OBJECTIVES,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    ROUTER_BALANCE,
    SCHEDULES,
    ConfigError,
)


def router_balance(config: Mapping[str, Any]) -> str:
    """The effective ``router.balance``: ``auto`` is ``bias`` for sparse routing, ``none`` for dense."""
    balance = config["router"]["balance"]
    if balance == "auto":
        k, _ = model_k_n(config)
        return "none" if k is None else "bias"
    return balance


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


def cuda_requested(config: Mapping[str, Any]) -> bool:
    """Whether the configured device is a GPU (``auto`` resolves to one when CUDA is available)."""
    device = str(config["device"])
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def validate(config: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first invalid setting; needs no data and no GPU."""
    choices = registry_choices()
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
    top_k = model["top_k"]
    _need(top_k is None or top_k == "all" or (_is_int(top_k) and top_k >= 1),
          f"model.top_k must be null (the preset's), 'all' (dense) or an integer >= 1; got {top_k!r}")
    _check_int(config, "model.num_prompts", 1, optional=True)
    _need(isinstance(model["overrides"], Mapping), "model.overrides must be a mapping")
    for key in ("top_k", "num_prompts"):
        _need(key not in model["overrides"], f"model.overrides.{key}: set model.{key} instead")
    k, n = model_k_n(config)
    if k is not None and n is not None:
        _need(k <= n, f"model.top_k={k} must not exceed model.num_prompts={n} (top-k of n experts)")

    cpr = config["cpr"]
    _need(cpr["recipe"] in RECIPES, f"cpr.recipe must be one of {', '.join(RECIPES)}; got {cpr['recipe']!r}")
    _check_number(config, "cpr.alpha", 0.0)
    _check_number(config, "cpr.alpha_relative", 0.0, optional=True)
    _need(cpr["alpha_relative"] is None or cpr["alpha_relative"] > 0,
          f"cpr.alpha_relative must be null (fixed alpha) or a positive fraction of L1; got "
          f"{cpr['alpha_relative']!r}")
    _check_choice(config, "cpr.distance", choices["cpr.distance"])
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
    _check_choice(config, "cpr.negative_sampler", choices["cpr.negative_sampler"])
    _check_int(config, "cpr.memory_size", 1)
    _check_choice(config, "cpr.form", choices["cpr.form"])
    _check_choice(config, "cpr.features", choices["cpr.features"])
    _need(isinstance(cpr["feature_options"], Mapping), "cpr.feature_options must be a mapping")
    _check_int(config, "cpr.neg_chunk", 1, optional=True)
    _need(cpr["neg_chunk"] is None or config["objective"] in ("fast", "auto"),
          f"cpr.neg_chunk chunks the negatives of objective fast; objective {config['objective']!r} "
          f"does not take it")
    _check_int(config, "cpr.negatives_per_step", 1, optional=True)
    _need(cpr["negatives_per_step"] is None or cpr["negatives_per_step"] <= cpr["m"],
          f"cpr.negatives_per_step={cpr['negatives_per_step']} must be <= cpr.m={cpr['m']}: set it to at "
          f"most m, or null for all m (cpr.recipe stable decodes "
          f"{RECIPES['stable']['cpr.negatives_per_step']} negatives a step)")
    if config["objective"] != "l1" and cpr["negative_sampler"] == "mismatched_experts" and n is not None:
        _need(cpr["m"] <= n - 1, f"cpr.m={cpr['m']} negatives with negative_sampler mismatched_experts need "
                                 f"m <= n - 1 = {n - 1} (each negative uses a different other expert)")

    _check_choice(config, "router.balance", ROUTER_BALANCE)
    _check_number(config, "router.aux_weight", 0.0)
    _check_number(config, "router.bias_rate", 0.0)
    if config["router"]["balance"] not in ("none", "auto"):
        _need(k is not None, f"router.balance={config['router']['balance']} balances sparse routing; the "
                             f"model is dense (model.top_k=all or a dense preset)")
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
    _check_choice(config, "data.layout", choices["data.layout"])
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
    """Effective ``(top_k, num_prompts)`` of the config's model: explicit settings, else the preset's
    (top_k None = dense)."""
    from cpl_fast.models.registry import section_routing

    try:
        return section_routing(config["model"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def registry_choices() -> dict[str, tuple[str, ...]]:
    """The choices that registries of lower layers own, by dotted setting (imports torch: read on use)."""
    from cpl_fast.data.layouts import LAYOUTS
    from cpl_fast.losses import CPR_DISTANCES, CPR_FORMS, FEATURES, NEGATIVE_SAMPLERS

    return {
        "cpr.distance": tuple(CPR_DISTANCES),
        "cpr.form": tuple(CPR_FORMS),
        "cpr.features": tuple(FEATURES),
        "cpr.negative_sampler": tuple(NEGATIVE_SAMPLERS),
        # "embedded": the built-in three-task set; "clean": a folder of clean images degraded on the
        # fly (the seven-task setting); the rest are the folder layouts of cpl_fast.data.
        "data.layout": ("embedded", "clean", *LAYOUTS),
    }

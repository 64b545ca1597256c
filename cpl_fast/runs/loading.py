"""Find the weights a ``--ckpt`` argument names and build the model they belong to.

``--ckpt`` may be

* a run folder of ``cpl-train`` (its ``config.yaml`` says which model; the newest complete checkpoint is
  used: the one ``latest`` names, or with a warning the newest one that is whole when that one is
  missing or damaged);
* a checkpoint folder ``RUN/checkpoints/step_N`` (``ema.safetensors`` preferred when present, as the
  trainer evaluates the EMA weights when EMA is on; the run's ``config.yaml`` is read when found);
* a weights file in any format ``cpl_fast.models.load_checkpoint`` reads: PromptIR's Lightning
  ``.ckpt``, CPL's BasicSR ``.pth`` (``params_ema`` preferred), a plain or DDP state dict,
  cpl_fast's ``.safetensors``.

The architecture comes from, in order: ``--model`` / ``--set model.*``, the run's config, the model
section a ``cpl-convert`` file records, and otherwise the weights themselves
(``cpl_fast.models.infer``: width, blocks, heads, prompts, selection biases, read from the shapes).
The routing is the one thing the shapes cannot say (a router has the same parameters dense or
top-k): selection biases imply top-1; otherwise a Lightning checkpoint (the layout of PromptIR's
release) is taken as dense and everything else as top-1 (CPL's release), with a note saying so.
A model that does not fit the weights is refused in two lines: what differs, and which ``--model``
fits (or to omit it).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpl_fast.config import read_run_config
from cpl_fast.models import PRESETS, LoadReport, load_checkpoint
from cpl_fast.models.checkpoint import (
    KeyMismatchError,
    checkpoint_metadata,
    read_checkpoint_file,
    read_state_dict,
)
from cpl_fast.models.infer import (
    ArchitectureError,
    compare_text,
    infer_architecture,
    model_architecture,
    model_section,
    preset_architecture,
    preset_top_k,
)
from cpl_fast.models.registry import current_section, model_from_config, preset_section
from cpl_fast.runs.checkpoints import latest_checkpoint
from cpl_fast.runs.layout import CHECKPOINT_DIR, CONFIG_FILE, EMA_FILE, MODEL_FILE


@dataclass
class LoadedModel:
    """A model with its weights, where they came from and the run config when there is one."""

    model: nn.Module
    weights: Path
    report: LoadReport
    model_config: dict[str, Any]
    run_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        top_k = getattr(self.model, "top_k", None)
        routing = "dense" if top_k is None else f"top-{top_k}"
        return (f"{self.model_config.get('preset', type(self.model).__name__)} ({routing}, "
                f"{getattr(self.model, 'num_prompts', '?')} prompts) from {self.weights} "
                f"[{self.report.layout}]")


def _read_run_config(path: Path) -> dict[str, Any] | None:
    return read_run_config(path) if path.is_file() else None


def resolve_weights(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """``(weights file, run config or None)`` for a ``--ckpt`` argument (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        # RUN/checkpoints/step_N/model.safetensors: the run's config is three levels up.
        run = path.parent.parent.parent if path.parent.parent.name == CHECKPOINT_DIR else None
        return path, _read_run_config(run / CONFIG_FILE) if run is not None else None
    if (path / CHECKPOINT_DIR).is_dir():
        folder, run_config = latest_checkpoint(path), _read_run_config(path / CONFIG_FILE)
    elif (path / MODEL_FILE).is_file():
        folder = path
        run_config = _read_run_config(path.parent.parent / CONFIG_FILE) \
            if path.parent.name == CHECKPOINT_DIR else None
    else:
        raise FileNotFoundError(f"{path} is a folder but neither a run folder (no {CHECKPOINT_DIR}/) nor a "
                                f"checkpoint folder (no {MODEL_FILE})")
    ema = folder / EMA_FILE
    return (ema if ema.is_file() else folder / MODEL_FILE), run_config


def routing_text(top_k: int | None) -> str:
    """``dense`` or ``top-k``."""
    return "dense" if top_k is None else f"top-{top_k}"


def section_top_k(section: Mapping[str, Any]) -> int | None:
    """The routing a config ``model`` section builds (None: dense)."""
    k = section.get("top_k")
    if k == "all":
        return None
    return preset_top_k(section["preset"]) if k is None else k


def checkpoint_model(weights: Path, raw: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The model section for weights without a run config, and a note saying where it came from.

    The section a cpl-convert file records, else the architecture read from the shapes with the
    routing default of the module docstring. ValueError naming the file when neither works.
    """
    raw = read_checkpoint_file(weights) if raw is None else raw
    recorded = None if weights.suffix == ".safetensors" else checkpoint_metadata(raw)
    if recorded is not None:
        if recorded.get("preset") not in PRESETS:
            raise ValueError(f"{weights}: the model recorded in the checkpoint names an unknown preset "
                             f"{recorded.get('preset')!r}; --model PRESET chooses one")
        recorded = current_section(recorded)
        section = preset_section(recorded["preset"], recorded.get("top_k"), recorded.get("num_prompts"),
                                 recorded.get("overrides"))
        return section, [f"model {section['preset']!r} ({routing_text(section_top_k(section))}) as "
                         f"recorded in the checkpoint"]
    layout, state = read_state_dict(raw)
    try:
        arch = infer_architecture(state)
    except ArchitectureError as exc:
        raise ValueError(f"{weights}: cannot tell the model from the weights ({exc}); --model PRESET "
                         f"chooses it") from None
    unknown = "routing is not in the weights; --set model.top_k=N or model.top_k=all to choose"
    if arch.sparse:
        top_k, why = 1, "selection biases, so sparse; k is not in the weights: --set model.top_k=N to choose"
    elif layout == "lightning":
        top_k, why = None, f"a Lightning checkpoint, PromptIR's layout; {unknown}"
    else:
        top_k, why = 1, f"a {layout.split(':')[0]} checkpoint, CPL's layout; {unknown}"
    section = model_section(arch, top_k)
    built = f"preset {section['preset']!r}"
    differences = arch.differences(preset_architecture(section["preset"]))
    if differences:
        built += f" with {arch.describe(differences)}"
    return section, [f"no run config: {built} read from the weights; {routing_text(top_k)} routing assumed "
                     f"({why})"]


def preset_model_note(where: str, preset_model: Mapping[str, Any],
                      weights_model: Mapping[str, Any]) -> str | None:
    """One line when a benchmark's model section (``where``: ``--preset three_task``) differs from the
    checkpoint's, saying that the checkpoint's is used; None when they build the same model."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            ours, theirs = model_from_config(preset_model), model_from_config(weights_model)
        a, b = model_architecture(theirs), model_architecture(ours)
    except (ValueError, TypeError) as exc:
        return f"{where}'s model cannot be compared with the checkpoint's ({exc}): the checkpoint's is used"
    # Selection biases are no difference: a router without them selects as one with zero biases.
    differs = [name for name in a.differences(b) if name != "route_bias"]
    top_a, top_b = section_top_k(weights_model), section_top_k(preset_model)
    if not differs and top_a == top_b:
        return None
    what = compare_text(a, b, f"{where}'s model", ignore=("route_bias",)) if differs else (
        f"the checkpoint's routing is {routing_text(top_a)}, {where}'s model's {routing_text(top_b)}")
    return f"{what}: the checkpoint's model is used (--model to choose another)"


def _mismatch_text(weights: Path, raw: Mapping[str, Any], model: nn.Module, config: Mapping[str, Any],
                   from_run: bool, exc: KeyMismatchError) -> str:
    """Two lines: what differs between the weights and the model built, then which model fits."""
    name = f"preset {config['preset']!r}" + (" with overrides" if config.get("overrides") else "")
    try:
        weights_arch = infer_architecture(read_state_dict(raw)[1])
        model_arch = model_architecture(model)
    except (ArchitectureError, ValueError):
        # Not an architecture we can read: the loader's own (bounded) list of the offending keys.
        text = str(exc).replace("<state dict>", str(weights))
        return f"{text}\nhint: the model was built as {name}; --model PRESET chooses another"
    if not weights_arch.differences(model_arch):
        # Same architecture, yet the keys disagree: the loader's own list says where.
        text = str(exc).replace("<state dict>", str(weights))
        return f"{text}\nhint: the model was built as {name}"
    first = f"{weights} does not fit the model: {compare_text(weights_arch, model_arch, name)}"
    if from_run:
        return f"{first}\nhint: the run's {CONFIG_FILE} does not describe these weights; --model PRESET " \
               f"chooses the model"
    fit = model_section(weights_arch, section_top_k(config))
    if fit["overrides"]:
        return (f"{first}\nhint: no preset builds these weights; omit --model to use the checkpoint's "
                "architecture")
    option = f"--model {fit['preset']}" \
        + (f" --set model.num_prompts={fit['num_prompts']}" if fit["num_prompts"] is not None else "") \
        + (f" --set model.top_k={fit['top_k']}" if fit["top_k"] is not None else "")
    return f"{first}\nhint: {option} fits these weights, or omit --model to use the checkpoint's architecture"


def load_model(ckpt: str | Path, model_config: Mapping[str, Any] | None = None,
               device: torch.device | str = "cpu", strict: bool = True) -> LoadedModel:
    """Weights named by ``ckpt`` in the model they belong to, on ``device``, in eval mode.

    ``model_config``: a config ``model`` section that overrides the run's (None: the run's, else the
    checkpoint's as in the module docstring). KeyMismatchError (a ValueError) in two lines when the
    model does not fit the weights.
    """
    weights, run_config = resolve_weights(ckpt)
    return load_weights(weights, run_config, model_config, device, strict)


def load_weights(weights: Path, run_config: dict[str, Any] | None,
                 model_config: Mapping[str, Any] | None = None, device: torch.device | str = "cpu",
                 strict: bool = True) -> LoadedModel:
    """``load_model`` for what ``resolve_weights`` already found: the weights file and its run config."""
    notes: list[str] = []
    raw: Any = read_checkpoint_file(weights)  # ValueError naming the file when it is not a checkpoint
    if model_config is not None:
        config = current_section(copy.deepcopy(dict(model_config)))
    elif run_config is not None:
        config = copy.deepcopy(dict(run_config["model"]))
    else:
        config, notes = checkpoint_model(weights, raw)
    model = model_from_config(config)
    try:
        report = load_checkpoint(model, raw, strict=strict)
    except KeyMismatchError as exc:  # the weights are fine; the model built for them is not theirs
        from_run = model_config is None and run_config is not None
        raise KeyMismatchError(_mismatch_text(weights, raw, model, config, from_run, exc)) from exc
    except ValueError as exc:
        raise ValueError(str(exc).replace("<state dict>", str(weights))) from exc
    report.source = str(weights)
    model.to(device).eval()
    return LoadedModel(model, weights, report, config, run_config, notes)

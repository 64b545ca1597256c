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

The architecture comes from, in order: ``--model`` / ``--set model.*``, the run's config, and
otherwise a default by checkpoint layout: ``promptir`` (dense) for a Lightning checkpoint (the layout
of PromptIR's release), ``cpl`` (top-1) for everything else. Sparse and dense models have the same
parameters, so this choice cannot be read from the weights.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpl_fast.models import LoadReport, build_model, load_checkpoint
from cpl_fast.models.checkpoint import KeyMismatchError

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


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
    if not path.is_file():
        return None
    from cpl_fast.train.config import read_yaml

    return read_yaml(path)


def resolve_weights(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """``(weights file, run config or None)`` for a ``--ckpt`` argument (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        # RUN/checkpoints/step_N/model.safetensors: the run's config is three levels up.
        run = path.parent.parent.parent if path.parent.parent.name == CHECKPOINTS else None
        return path, _read_run_config(run / RUN_CONFIG) if run is not None else None
    if (path / CHECKPOINTS).is_dir():
        from cpl_fast.train.checkpointing import latest_checkpoint

        folder, run_config = latest_checkpoint(path), _read_run_config(path / RUN_CONFIG)
    elif (path / MODEL_FILE).is_file():
        folder = path
        run_config = _read_run_config(path.parent.parent / RUN_CONFIG) \
            if path.parent.name == CHECKPOINTS else None
    else:
        raise FileNotFoundError(f"{path} is a folder but neither a run folder (no {CHECKPOINTS}/) nor a "
                                f"checkpoint folder (no {MODEL_FILE})")
    ema = folder / EMA_FILE
    return (ema if ema.is_file() else folder / MODEL_FILE), run_config


def model_from_config(model_config: Mapping[str, Any]) -> nn.Module:
    """Build the model of a config's ``model`` section (``preset``, ``k``, ``n``, ``overrides``)."""
    kwargs = dict(model_config.get("overrides") or {})
    k = model_config.get("k")
    if k is not None:
        kwargs["top_k"] = None if k == "all" else k
    if model_config.get("n") is not None:
        kwargs["num_prompts"] = model_config["n"]
    return build_model(model_config["preset"], **kwargs)


def _layout(raw: Mapping[str, Any]) -> str:
    if isinstance(raw.get("state_dict"), Mapping):
        return "lightning"
    return "other"


def load_model(ckpt: str | Path, model_config: Mapping[str, Any] | None = None,
               device: torch.device | str = "cpu", strict: bool = True) -> LoadedModel:
    """Weights named by ``ckpt`` in the model they belong to, on ``device``, in eval mode.

    ``model_config``: a config ``model`` section that overrides the run's (None: the run's, else the
    layout default of the module docstring).
    """
    from cpl_fast.models.checkpoint import read_checkpoint_file

    weights, run_config = resolve_weights(ckpt)
    notes = []
    raw: Any = read_checkpoint_file(weights)  # ValueError naming the file when it is not a checkpoint
    layout = "other" if weights.suffix == ".safetensors" else _layout(raw)
    if model_config is not None:
        config = copy.deepcopy(dict(model_config))
    elif run_config is not None:
        config = copy.deepcopy(dict(run_config["model"]))
    else:
        preset = "promptir" if layout == "lightning" else "cpl"
        config = {"preset": preset, "k": None, "n": None, "overrides": {}}
        notes.append(f"no run config: model preset {preset!r} assumed for a {layout} checkpoint "
                     f"(--model to choose another)")
    model = model_from_config(config)
    try:
        report = load_checkpoint(model, raw, strict=strict)
    except KeyMismatchError as exc:  # the weights are fine; the model built for them may not be
        text = str(exc).replace("<state dict>", str(weights))
        raise KeyMismatchError(f"{text}\n(the model was built as preset {config['preset']!r}, "
                               f"k={config.get('k')}; is that the checkpoint's architecture? --model / "
                               f"--set model.k=... choose another)") from exc
    except ValueError as exc:
        raise ValueError(str(exc).replace("<state dict>", str(weights))) from exc
    report.source = str(weights)
    model.to(device).eval()
    return LoadedModel(model, weights, report, config, run_config, notes)

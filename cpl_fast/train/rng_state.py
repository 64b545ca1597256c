"""What a checkpoint holds besides the weights, so that a resumed run replays the uninterrupted one.

The global RNGs (torch, CUDA, numpy, Python), the negatives' and the data loader's generators, the
``other_task`` sampler's memory, the optimiser, schedule and scaler, and the run's records (history,
CPR calibration, training health, validations, best). ``capture_trainer_state`` and
``restore_trainer_state`` are the one place that lists them, so the two cannot drift apart.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cpl_fast.losses.negatives import OtherTask

if TYPE_CHECKING:
    from cpl_fast.train.trainer import Trainer


def capture_rng() -> dict[str, Any]:
    """Global RNG states: torch CPU (and CUDA), numpy, Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sampler_memory(sampler: Any) -> list | None:
    """The routings an ``other_task`` sampler remembers (None for a sampler without memory)."""
    if isinstance(sampler, OtherTask):
        return [list(entries) for entries in sampler.memory]
    return None


def restore_sampler_memory(sampler: Any, saved: list | None, device: torch.device) -> None:
    if saved is None:
        return
    for entries, rows in zip(sampler.memory, saved, strict=True):
        entries.clear()
        entries.extend(tuple((i.to(device), w.to(device)) for i, w in row) for row in rows)


def capture_trainer_state(trainer: Trainer) -> dict[str, Any]:
    """Everything of ``trainer`` a checkpoint keeps besides the weights and ``state.json``."""
    return {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(), "rng": capture_rng(),
            "negative_generator": trainer.context.generator.get_state(),
            "loader_generator": trainer.loader_generator.get_state(),
            "sampler_memory": sampler_memory(getattr(trainer, "negative_sampler", None)),
            "history": trainer.history, "cpr_calibration": trainer.cpr_weight.state_dict(),
            "health": trainer.health.state_dict(), **trainer.records.state_dict()}


def restore_trainer_state(trainer: Trainer, state: Mapping[str, Any]) -> None:
    """Put ``capture_trainer_state``'s dict back, except the optimiser and the schedule (the trainer
    restores those first: a run resumed with a new length lays its schedule over the new one)."""
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.context.generator.set_state(state["negative_generator"])
    trainer.loader_generator.set_state(state["loader_generator"])
    restore_sampler_memory(getattr(trainer, "negative_sampler", None), state["sampler_memory"],
                           trainer.device)
    trainer.history = list(state["history"])
    trainer.cpr_weight.load_state_dict(state.get("cpr_calibration"))
    trainer.health.load_state_dict(state.get("health") or {})
    trainer.records.load_state_dict(state)
    # Last: nothing after it may draw from the global generators before the first resumed step.
    restore_rng(state["rng"])

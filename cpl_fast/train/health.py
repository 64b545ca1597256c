"""Training-health bookkeeping of the trainer: routing statistics over a window, the CPR/L1 gradient
ratio, and collapse warnings (the statistics themselves are in ``cpl_fast.metrics.routing``).

Every ``train.log_every`` steps the window of selections (all levels, with the batch's task ids) is
summarised into ``usage_entropy_l{level}`` and ``task_info_l{level}`` (bits) for the logs. Every
``health.grad_ratio_every`` steps of a CPR step the gradients of the L1 and CPR terms on the shared
network (every parameter outside the prompt modules) are taken separately, and their norm ratio
``grad_ratio`` is logged: above 1, the regulariser drives the shared network more than the
reconstruction does. Warnings (``health.warn``) are given once per kind and level.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cpl_fast.metrics.routing import collapse_warnings, routing_health

# Below this many windows of data, a warning is premature: routers start collapsed and may recover.
WARN_AFTER_STEPS = 20


class TrainingHealth:
    def __init__(self, model: nn.Module, config: Mapping[str, Any], log: Callable[[str], None]) -> None:
        self.model = model
        self.config = config
        self.log = log
        self.num_prompts = int(getattr(model, "num_prompts", 0))
        self.sparse = getattr(model, "top_k", None) is not None and hasattr(model, "prompt_modules")
        self.window: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self.warned: set[str] = set()
        self.recent_gap: float | None = None
        prompts = {id(p) for spm in model.prompt_modules() for p in spm.parameters()} \
            if hasattr(model, "prompt_modules") else set()
        self.shared = [p for p in model.parameters() if id(p) not in prompts and p.requires_grad]

    # -------------------------------------------------------------------------- routing window

    def observe(self, indices: list[torch.Tensor], task_ids: torch.Tensor) -> None:
        if self.sparse:
            self.window.append(([i.cpu() for i in indices], task_ids.cpu()))

    def summary(self, step: int, prompt_gap: float | None = None) -> dict[str, float]:
        """Statistics of the window since the last call (then emptied), and warnings if due."""
        if not self.window:
            return {}
        levels = len(self.window[0][0])
        tasks = torch.cat([t for _, t in self.window])
        stats = [routing_health(torch.cat([w[0][level] for w in self.window]), tasks, self.num_prompts)
                 for level in range(levels)]
        self.window.clear()
        out: dict[str, float] = {}
        for level, s in enumerate(stats):
            out[f"usage_entropy_l{level}"] = s["usage_entropy"]
            if s["task_information"] is not None:
                out[f"task_info_l{level}"] = s["task_information"]
        if self.config["health"]["warn"] and step >= WARN_AFTER_STEPS:
            for message in collapse_warnings(stats, prompt_gap):
                key = message.split(":")[0]
                if key not in self.warned:
                    self.warned.add(key)
                    self.log(f"warning: {message}")
        return out

    # -------------------------------------------------------------------------- gradient ratio

    def wants_grad_ratio(self, step: int, out: Any, distributed: bool) -> bool:
        every = self.config["health"]["grad_ratio_every"]
        return (every > 0 and (step + 1) % every == 0 and not distributed and bool(self.shared)
                and out.cpr.requires_grad and out.l1.requires_grad)

    def grad_ratio(self, out: Any) -> float:
        """``|grad_shared CPR| / |grad_shared L1|`` (the graph is kept for the step's own backward)."""
        def norm(term: torch.Tensor) -> float:
            grads = torch.autograd.grad(term, self.shared, retain_graph=True, allow_unused=True)
            squares = [g.double().pow(2).sum() for g in grads if g is not None]
            return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

        l1 = norm(out.l1)
        return norm(out.cpr) / l1 if l1 > 0 else float("nan")

    # -------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"warned": sorted(self.warned)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.warned = set(state.get("warned", []))

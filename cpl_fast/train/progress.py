"""What a training step shows: the metric groups, the progress bar's postfix and the log line.

The numbers come from ``Trainer.train_step`` (the losses, rates and, every ``train.log_every`` steps,
the training-health summary); this module only decides how they are grouped and written.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

HEALTH_KEYS = ("prompt_gap", "grad_ratio", "router_aux")


def log_group(key: str) -> str:
    """``health`` for the training-health signals, ``train`` for the losses and rates."""
    return "health" if key in HEALTH_KEYS or key.startswith(("usage_entropy_l", "task_info_l")) else "train"


class BarPostfix:
    """The progress bar's postfix; the health values persist between the steps that measure them."""

    def __init__(self) -> None:
        self.shown: dict[str, float] = {}

    def __call__(self, terms: Mapping[str, float], lr: float) -> dict[str, str]:
        self.shown.update({key: value for key, value in terms.items() if key == "prompt_gap"
                           or key.startswith("task_info_l")})
        health = {}
        if "prompt_gap" in self.shown:
            health["gap_db"] = f"{self.shown['prompt_gap']:.1f}"
        infos = [v for k, v in self.shown.items() if k.startswith("task_info_l")]
        if infos:
            health["task_bits"] = f"{max(infos):.2f}"
        return dict(loss=f"{terms['loss']:.4f}", l1=f"{terms['l1']:.4f}", cpr=f"{terms['cpr']:.2e}",
                    lr=f"{lr:.1e}", img_s=f"{terms['images_per_s']:.1f}", **health)


def step_line(terms: Mapping[str, float], step: int, total_steps: int, start_step: int,
              started: float) -> str:
    """The log line of step ``step``; the ETA extrapolates the steps since ``start_step``
    (``time.perf_counter()`` value ``started``)."""
    done = step - start_step
    eta = (time.perf_counter() - started) / max(done, 1) * (total_steps - step)
    health = "".join(f" {key} {terms[key]:.2f}" for key in sorted(terms) if log_group(key) == "health")
    return (f"step {step}/{total_steps} loss {terms['loss']:.5f} l1 {terms['l1']:.5f} "
            f"cpr {terms['cpr']:.3e} lr {terms['lr']:.2e} {terms['images_per_s']:.1f} img/s "
            f"eta {eta:.0f}s{health}")

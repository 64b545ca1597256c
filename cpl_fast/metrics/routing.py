"""Training-health signals of a sparse prompt model: expert usage, task information, prompt gap.

* ``routing_health(indices, task_ids, n)``: for one prompt level, how often each expert is selected
  (``usage``), the entropy of that histogram (bits; 0 = one expert takes everything, ``log2 n`` =
  uniform), the share of the busiest expert and, with task labels, the mutual information between
  task and selected expert (bits; 0 = the routing says nothing about the degradation);
* ``prompt_gap_db(restored, negative_images, target)``: PSNR of the positive minus the mean PSNR of
  the negatives (decoded with mismatched prompts), both against the target, in dB. A few dB means
  the prompts matter; tens of dB mean a mismatched prompt wrecks the image (the network amplifies
  prompt differences, which CPR's negative term rewards);
* ``collapse_warnings``: plain-language warnings naming the setting to change.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cpl_fast.metrics.image import batch_psnr, entropy_bits

# Below these, routing has collapsed: (nearly) one expert for everything, and no task information.
COLLAPSE_USAGE_BITS = 0.2
COLLAPSE_TASK_BITS = 0.05
# A mismatched prompt costing more than this many dB means the network amplifies prompt differences.
LARGE_GAP_DB = 10.0


def information_from_counts(per_task: Sequence[torch.Tensor]) -> float:
    """Mutual information (bits) between task and expert from each task's expert histogram ``(n,)``:
    the pooled histogram's entropy minus the selection-weighted mean of the per-task ones."""
    counts = [c.double() for c in per_task]
    sizes = [float(c.sum()) for c in counts]
    total = sum(sizes)
    if total == 0:
        return 0.0
    pooled = entropy_bits(torch.stack(counts).sum(dim=0))
    within = sum(size * entropy_bits(c) for size, c in zip(sizes, counts)) / total
    return max(0.0, pooled - within)


def task_expert_information(indices: torch.Tensor, task_ids: torch.Tensor, n: int) -> float:
    """Mutual information (bits) between the task and the selected expert of ``indices (N, k)``."""
    tasks = task_ids.flatten().to(indices.device)
    return information_from_counts([torch.bincount(indices[tasks == task].flatten(), minlength=n)
                                    for task in torch.unique(tasks)])


def routing_health(indices: torch.Tensor, task_ids: torch.Tensor | None, n: int) -> dict[str, Any]:
    """Usage statistics of one level's selections ``indices (N, k)`` (see the module docstring)."""
    counts = torch.bincount(indices.flatten().cpu(), minlength=n).double()
    usage = counts / counts.sum().clamp_min(1)
    out: dict[str, Any] = {"usage": usage.tolist(), "usage_entropy": entropy_bits(counts),
                           "top_share": float(usage.max()), "top_expert": int(usage.argmax())}
    distinct = 0 if task_ids is None else int(torch.unique(task_ids).numel())
    out["task_information"] = (task_expert_information(indices.cpu(), task_ids.cpu(), n)
                               if distinct > 1 else None)
    return out


def prompt_gap_db(restored: torch.Tensor, negative_images: torch.Tensor, target: torch.Tensor) -> float:
    """Mean PSNR of ``restored (B, ...)`` minus the mean PSNR of ``negative_images (m, B, ...)``."""
    with torch.no_grad():
        positive = batch_psnr(restored.detach(), target).mean()
        negative = batch_psnr(negative_images.detach(), target.unsqueeze(0)).mean()
    return float(positive - negative)


def collapse_warnings(levels: Sequence[dict[str, Any]], gap_db: float | None = None) -> list[str]:
    """Warnings for collapsed levels (one expert, no task information) and a very large prompt gap."""
    out = []
    for level, stats in enumerate(levels):
        task_bits = stats.get("task_information")
        uninformative = task_bits is None or task_bits < COLLAPSE_TASK_BITS
        if stats["usage_entropy"] < COLLAPSE_USAGE_BITS and uninformative:
            told = "" if task_bits is None else f", task information {task_bits:.2f} bits"
            out.append(f"routing collapsed at prompt level {level}: expert {stats['top_expert']} takes "
                       f"{100 * stats['top_share']:.0f}% of the samples{told}. The experts cannot "
                       f"specialise; try router.balance=bias (or aux_loss)")
    if gap_db is not None and gap_db > LARGE_GAP_DB:
        out.append(f"prompt gap {gap_db:.1f} dB: a mismatched prompt wrecks the restoration, so the network "
                   f"amplifies prompt differences (CPR's negative term rewards that, and it leaves "
                   f"artefacts); try cpr.recipe=stable, a bounded cpr.form (hinge, logistic), "
                   f"cpr.neg_grad=none or a smaller cpr.alpha")
    return out

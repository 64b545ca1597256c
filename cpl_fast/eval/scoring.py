"""Per-task scores under a metric protocol, with the routing statistics of every prompt level.

``evaluate(model, dataset, device, protocol="promptir")`` restores every full test image (padded to
the model's multiple, cropped back; tiled when asked) and returns, per task, the mean PSNR / SSIM,
the protocol's name and per prompt level (application order: the deepest prompt first):

* ``counts``: how often each expert was selected (over images and the top-k slots);
* ``mean_probs``: the router's softmax averaged over images;
* ``selection_entropy`` (bits): the entropy of the average selection distribution -- of the
  normalised counts for sparse routing, of ``mean_probs`` for dense routing. 0 bits: every image of
  the task uses the same expert; ``log2 n``: all experts equally;
* ``mean_softmax_entropy`` (bits): each image's router entropy, averaged (the paper's Fig. 4
  measure for PromptIR: how peaked one decision is).

``scores_table`` formats results as a table with the protocol next to every number.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cpl_fast.inference.restoration import DEFAULT_OVERLAP, check_tiling, model_multiple, restore_image
from cpl_fast.metrics.image import entropy_bits
from cpl_fast.metrics.protocols import Protocol, average, get_protocol
from cpl_fast.tables import markdown_table


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, multiple: int | None = None, max_images: int | None = None,
             protocol: str | Protocol = "promptir", tile: int | str | None = None,
             overlap: int = DEFAULT_OVERLAP, amp: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Per-task scores and routing statistics (see the module docstring); keys sorted by task.

    ``dataset`` items are dicts with ``input``, ``target`` ``(3, H, W)`` and ``task`` (``EvalDataset``).
    ``device`` / ``dtype`` (default: the model's) move the model; it is put in eval mode and returned
    to its previous mode afterwards.
    """
    from tqdm.auto import tqdm

    protocol = get_protocol(protocol)
    if isinstance(tile, int):
        check_tiling(tile, overlap, model_multiple(model) if multiple is None else multiple)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    per_task: dict[str, dict[str, Any]] = {}
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    try:
        for index in tqdm(range(count), desc="evaluating", leave=False, disable=not progress):
            item = dataset[index]
            image, target = protocol.prepare(item["input"]), protocol.prepare(item["target"])
            result = restore_image(model, image, tile=tile, overlap=overlap, amp=amp, multiple=multiple)
            p, s = protocol.score(result.image.cpu(), target)
            task = per_task.setdefault(item["task"], {"psnr": [], "ssim": [], "levels": []})
            task["psnr"].append(p)
            task["ssim"].append(s)
            if not task["levels"]:
                task["levels"] = [{"indices": [], "probs": [], "dense": False} for _ in result.routing]
            for level, r in zip(task["levels"], result.routing, strict=True):
                level["indices"].append(r.indices.cpu())
                level["probs"].append(r.probs.double().cpu())
                level["dense"] = r.indices.shape[1] == r.probs.shape[1]
    finally:
        model.train(was_training)
    return {name: summarise(task, protocol.name) for name, task in sorted(per_task.items())}


def score_inputs(dataset: Any, protocol: str | Protocol = "promptir",
                 max_images: int | None = None) -> dict[str, Any]:
    """Per-task scores of the degraded inputs themselves (the "no restoration" reference row)."""
    protocol = get_protocol(protocol)
    per_task: dict[str, dict[str, list[float]]] = {}
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    for index in range(count):
        item = dataset[index]
        p, s = protocol.score(protocol.prepare(item["input"]), protocol.prepare(item["target"]))
        task = per_task.setdefault(item["task"], {"psnr": [], "ssim": []})
        task["psnr"].append(p)
        task["ssim"].append(s)
    return {name: {"images": len(t["psnr"]), "psnr": float(np.mean(t["psnr"])),
                   "ssim": float(np.mean(t["ssim"])), "protocol": protocol.name, "levels": []}
            for name, t in sorted(per_task.items())}


def level_statistics(indices: torch.Tensor, probs: torch.Tensor, dense: bool) -> dict[str, Any]:
    """The statistics of one prompt level over a task's images (``indices (N, k)``, ``probs (N, n)``)."""
    n = probs.shape[1]
    counts = torch.bincount(indices.flatten(), minlength=n).double()
    mean_probs = probs.double().mean(dim=0)
    selection = entropy_bits(mean_probs if dense else counts)
    per_image = float(sum(entropy_bits(p) for p in probs) / probs.shape[0])
    return {"dense": dense, "counts": counts.tolist(), "mean_probs": mean_probs.tolist(),
            "selection_entropy": selection, "mean_softmax_entropy": per_image}


def summarise(task: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    """Mean scores and per-level statistics of one task's raw lists."""
    levels = [level_statistics(torch.cat(level["indices"]), torch.cat(level["probs"]), level["dense"])
              for level in task["levels"]]
    return {"images": len(task["psnr"]), "psnr": float(np.mean(task["psnr"])),
            "ssim": float(np.mean(task["ssim"])), "protocol": protocol, "levels": levels}


def scores_table(scores: Mapping[str, Mapping[str, Any]], protocol: Protocol,
                 markdown: bool = False) -> str:
    """Per-task and average PSNR / SSIM, the protocol named on every row."""
    rows = [(task, str(s["images"]), f"{s['psnr']:.2f}", f"{s['ssim']:.4f}") for task, s in scores.items()]
    mean = average(scores)
    images = sum(s["images"] for s in scores.values())
    rows.append(("average", str(images), f"{mean['psnr']:.2f}", f"{mean['ssim']:.4f}"))
    header = ("task", "images", "PSNR (dB)", "SSIM")
    label = protocol.label
    if markdown:
        return markdown_table([*header, "protocol"], [[*row, label] for row in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header) + "  protocol", line(["-" * w for w in widths]) + "  " + "-" * len(label)]
    out += [line(r) + f"  {label}" for r in rows]
    return "\n".join(out)

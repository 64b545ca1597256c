"""The prompt gap on an evaluation set: PSNR with the image's own routing minus PSNR with every other
expert in turn (CPR's ``mismatched_experts`` negatives), per task and overall."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cpl_fast.inference.restoration import restore_image
from cpl_fast.metrics.image import batch_psnr
from cpl_fast.metrics.protocols import get_protocol
from cpl_fast.models import Routing


@torch.no_grad()
def eval_prompt_gap(model: nn.Module, dataset: Any, max_images: int | None = None,
                    protocol: Any = None) -> dict[str, Any]:
    """Per task and overall: PSNR with the image's own routing and with every selected expert shifted
    by ``s = 1 .. n-1`` (all levels at once, CPR's ``mismatched_experts`` negatives), and their gap."""
    crop = get_protocol(protocol).prepare if protocol is not None else (lambda image: image)
    model.eval()
    n = int(model.num_prompts)
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    per_task: dict[str, dict[str, list[float]]] = {}
    for index in range(count):
        item = dataset[index]
        image, target = crop(item["input"]), crop(item["target"]).unsqueeze(0)
        own = restore_image(model, image)
        scores = per_task.setdefault(item["task"], {"positive": [], "negative": []})
        scores["positive"].append(float(batch_psnr(own.image.cpu(), target)))
        for shift in range(1, n):
            routing = [Routing((r.indices + shift) % n, r.weights) for r in own.routing]
            shifted = restore_image(model, image, routing=routing).image.cpu()
            scores["negative"].append(float(batch_psnr(shifted, target)))
    if not per_task:
        raise ValueError("the dataset is empty: no prompt gap to measure")

    def summary(positive: list[float], negative: list[float]) -> dict[str, float]:
        pos = sum(positive) / len(positive)
        neg = sum(negative) / len(negative) if negative else math.nan
        return {"psnr_positive": pos, "psnr_negative": neg, "gap_db": pos - neg}

    out = {task: summary(s["positive"], s["negative"]) for task, s in sorted(per_task.items())}
    out["all"] = summary([v for s in per_task.values() for v in s["positive"]],
                         [v for s in per_task.values() for v in s["negative"]])
    return out

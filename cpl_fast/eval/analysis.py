"""Routing analysis: selection entropy (Fig. 4), selection histograms and maps (Fig. 11), residuals (Fig. 5).

``collect_routing`` runs a model over an evaluation set and keeps, for every image, each prompt
level's selected experts, gate weights and router softmax. From that:

* ``entropy_table``: per task and level, the *selection entropy* (bits; of the histogram of selected
  experts for sparse routing, of the mean softmax for dense routing) and the *mean softmax entropy*
  (bits; each image's router entropy, averaged -- the quantity of the paper's Fig. 4 for PromptIR);
* ``task_information``: per level, the mutual information between task and selected expert (pooled
  selection entropy minus the mean per-task one): low per-task entropy means consistent routing,
  this says whether different tasks are routed differently;
* ``plot_entropy``: both as bars per task and level, with ``log2 n`` (uniform) marked;
* ``plot_histograms``: how often each expert is selected, per task and level;
* ``plot_selection_map``: Fig. 11's per-sample map -- one panel per level, one column per image
  (grouped by task), one row per expert, the colour the expert's gate weight (0 when unselected);
* ``prompt_gap`` (in ``analyze``'s JSON, sparse routing only): per task, the PSNR with the image's own
  prompts, the mean PSNR with every selected expert shifted to each other one, and their gap (dB);
* ``residual_maps`` / ``plot_residuals``: Fig. 5 -- for one image per task, the residual
  ``|restored - target|`` (restoration clipped to [0, 1], mean over channels) when decoded with its
  own (matched) routing, with the routing of an image of each other task and with every selected
  expert swapped for another (mismatched), with their PSNRs.

Levels are numbered in application order (level 0 is the deepest prompt, ``prompt3`` in PromptIR).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cpl_fast.data.io import atomic_write_bytes
from cpl_fast.eval.evaluate import level_statistics
from cpl_fast.eval.health import eval_prompt_gap
from cpl_fast.eval.inference import restore_image
from cpl_fast.eval.metrics import psnr
from cpl_fast.eval.protocols import Protocol, get_protocol
from cpl_fast.models import Routing

SHIFTED = "other experts"


def _prepare(protocol: str | Protocol | None):
    return get_protocol(protocol).prepare if protocol is not None else (lambda image: image)


def _finite(value: Any) -> Any:
    """JSON-safe: infinite / NaN floats (the PSNR of identical images) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class RoutingRecord:
    """The routing of every image: ``indices[l] (N, k)``, ``weights[l] (N, k)``, ``probs[l] (N, n)``."""

    tasks: list[str]
    names: list[str]
    indices: list[torch.Tensor]
    weights: list[torch.Tensor]
    probs: list[torch.Tensor]

    @property
    def num_levels(self) -> int:
        return len(self.indices)

    @property
    def num_prompts(self) -> int:
        return int(self.probs[0].shape[1])

    @property
    def dense(self) -> bool:
        return self.indices[0].shape[1] == self.probs[0].shape[1]

    def task_order(self) -> list[str]:
        return sorted(set(self.tasks), key=self.tasks.index)

    def rows(self, task: str) -> torch.Tensor:
        return torch.tensor([i for i, t in enumerate(self.tasks) if t == task])

    def gate_matrix(self, level: int) -> torch.Tensor:
        """``(N, n)``: each image's gate weight per expert (0 where not selected)."""
        out = torch.zeros(len(self.tasks), self.num_prompts, dtype=torch.float64)
        return out.scatter(1, self.indices[level], self.weights[level].double())


@torch.no_grad()
def collect_routing(model: nn.Module, dataset: Any, max_images: int | None = None,
                    progress: bool = False, protocol: str | Protocol | None = None) -> RoutingRecord:
    """Run ``model`` (eval mode) over ``dataset`` (``EvalDataset`` items) keeping each image's routing;
    ``protocol``: crop the inputs as that metric protocol does (None: full images)."""
    from tqdm.auto import tqdm

    crop = _prepare(protocol)
    model.eval()
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    tasks, names, per_level = [], [], []
    for index in tqdm(range(count), desc="routing", leave=False, disable=not progress):
        item = dataset[index]
        result = restore_image(model, crop(item["input"]))
        if not per_level:
            per_level = [([], [], []) for _ in result.routing]
        for store, r in zip(per_level, result.routing, strict=True):
            if r.probs is None:
                raise ValueError("the model returned a routing without router probabilities")
            store[0].append(r.indices.cpu())
            store[1].append(r.weights.float().cpu())
            store[2].append(r.probs.double().cpu())
        tasks.append(item["task"])
        names.append(str(item.get("name", index)))
    if not tasks:
        raise ValueError("the dataset is empty: nothing to analyse")
    return RoutingRecord(tasks, names, [torch.cat(s[0]) for s in per_level],
                         [torch.cat(s[1]) for s in per_level], [torch.cat(s[2]) for s in per_level])


def entropy_table(record: RoutingRecord) -> dict[str, list[dict[str, Any]]]:
    """Per task: per level ``selection_entropy``, ``mean_softmax_entropy``, ``counts``, ``mean_probs``."""
    table = {}
    for task in record.task_order():
        rows = record.rows(task)
        table[task] = [level_statistics(record.indices[lv][rows], record.probs[lv][rows], record.dense)
                       for lv in range(record.num_levels)]
    return table


def task_information(record: RoutingRecord) -> list[dict[str, float]]:
    """Per level: the pooled selection entropy over all images, the image-weighted mean of the per-task
    selection entropies, and their difference -- the mutual information (bits) between the task and
    the selected expert (for dense routing: of the mean softmax distributions). 0 bits: the routing
    carries no information about the task (e.g. every image uses the same expert)."""
    table = entropy_table(record)
    sizes = {task: len(record.rows(task)) for task in table}
    total = sum(sizes.values())
    out = []
    for lv in range(record.num_levels):
        pooled = level_statistics(record.indices[lv], record.probs[lv], record.dense)["selection_entropy"]
        within = sum(sizes[t] * table[t][lv]["selection_entropy"] for t in table) / total
        out.append({"pooled_selection_entropy": pooled, "mean_task_selection_entropy": within,
                    "task_expert_information": max(0.0, pooled - within)})
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_entropy(table: Mapping[str, Sequence[Mapping[str, Any]]], num_prompts: int, path: Path,
                 title: str = "") -> Path:
    """Bars of selection and mean softmax entropy per task and level (Fig. 4's measure)."""
    plt = _plt()
    tasks = list(table)
    levels = len(next(iter(table.values())))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(tasks)), 3.8), sharey=True)
    width = 0.8 / levels
    for ax, key, name in zip(axes, ("selection_entropy", "mean_softmax_entropy"),
                             ("selection entropy", "mean per-image softmax entropy")):
        for lv in range(levels):
            xs = np.arange(len(tasks)) + (lv - (levels - 1) / 2) * width
            ax.bar(xs, [table[t][lv][key] for t in tasks], width, label=f"level {lv}")
        ax.axhline(math.log2(num_prompts), color="k", ls="--", lw=1, label=f"log2 {num_prompts} (uniform)")
        ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        ax.set(title=name, ylabel="bits")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histograms(table: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, dense: bool,
                    title: str = "") -> Path:
    """Selection frequency of every expert, per level (rows) and task (columns)."""
    plt = _plt()
    tasks = list(table)
    levels = len(next(iter(table.values())))
    fig, axes = plt.subplots(levels, len(tasks), figsize=(2.3 * len(tasks), 1.9 * levels), sharey=True,
                             squeeze=False)
    for lv in range(levels):
        for c, task in enumerate(tasks):
            stats = table[task][lv]
            values = np.asarray(stats["mean_probs"] if dense else stats["counts"], dtype=float)
            values = values / values.sum() if values.sum() > 0 else values
            ax = axes[lv][c]
            ax.bar(range(len(values)), values, color=f"C{lv}")
            ax.set_xticks(range(len(values)))
            ax.set_ylim(0, 1)
            if lv == 0:
                ax.set_title(task, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"level {lv}")
            if lv == levels - 1:
                ax.set_xlabel("expert")
    fig.suptitle(title or ("mean softmax per expert" if dense else "share of images selecting each expert"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection_map(record: RoutingRecord, path: Path, title: str = "") -> Path:
    """Fig. 11: per level, experts (rows) x images grouped by task (columns), coloured by gate weight."""
    plt = _plt()
    order = [i for task in record.task_order() for i in record.rows(task).tolist()]
    fig, axes = plt.subplots(record.num_levels, 1, figsize=(max(8, 0.09 * len(order) + 2),
                                                            1.3 * record.num_levels + 1.2), squeeze=False)
    bounds = []
    for task in record.task_order():
        start = bounds[-1][1] if bounds else 0
        bounds.append((task, start + len(record.rows(task))))
    image = None
    for lv in range(record.num_levels):
        ax = axes[lv][0]
        matrix = record.gate_matrix(lv)[order].T.numpy()
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(matrix.max())),
                          interpolation="nearest")
        ax.set_yticks(range(record.num_prompts))
        ax.set_ylabel(f"level {lv}\nexpert")
        start = 0
        for task, end in bounds:
            if end < len(order):
                ax.axvline(end - 0.5, color="w", lw=1.5)
            if lv == 0:
                ax.text((start + end - 1) / 2, -0.8, task, ha="center", va="bottom", fontsize=8)
            start = end
        ax.set_xticks([])
    axes[-1][0].set_xlabel("test images, grouped by task")
    if image is not None:
        fig.colorbar(image, ax=[a[0] for a in axes], label="gate weight", fraction=0.02, pad=0.01)
    fig.suptitle(title or "per-image prompt selection", y=0.995)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


@torch.no_grad()
def residual_maps(model: nn.Module, dataset: Any, record: RoutingRecord,
                  protocol: str | Protocol | None = None) -> list[dict[str, Any]]:
    """Fig. 5: per task, one image decoded with its own routing, with each other task's (the first
    image of each task) and with its experts swapped for others (``SHIFTED``); ``protocol`` crops as in
    ``collect_routing``."""
    crop = _prepare(protocol)
    first = {task: int(record.rows(task)[0]) for task in record.task_order()}
    out = []
    for task, index in first.items():
        item = dataset[index]
        image, clean = crop(item["input"]), crop(item["target"])
        target = clean.unsqueeze(0)
        entry: dict[str, Any] = {"task": task, "name": record.names[index], "input": image,
                                 "target": clean, "variants": []}
        own = [Routing(record.indices[lv][index:index + 1], record.weights[lv][index:index + 1])
               for lv in range(record.num_levels)]
        # Mismatched prompts as CPR's default sampler makes them: every selected expert swapped for
        # another one (here the next, cyclically) with the same gate weight; for dense routing this
        # rolls the weights over the experts.
        shifted = [Routing((r.indices + 1) % record.num_prompts, r.weights) for r in own]
        candidates = [(t, [Routing(record.indices[lv][s:s + 1], record.weights[lv][s:s + 1])
                           for lv in range(record.num_levels)]) for t, s in first.items()]
        candidates.append((SHIFTED, shifted))
        for source_task, routing in candidates:
            restored = restore_image(model, image, routing=routing).image.cpu().clamp(0.0, 1.0)
            residual = (restored - target).abs().mean(dim=1)[0]
            entry["variants"].append({"routing_of": source_task, "matched": source_task == task,
                                      "psnr": psnr(restored, target),
                                      "mean_abs_residual": float(residual.mean()), "residual": residual})
        out.append(entry)
    return out


def plot_residuals(maps: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Rows: tasks; columns: input, target, then residuals with each task's routing (matched first)."""
    plt = _plt()
    columns = 2 + len(maps[0]["variants"])
    fig, axes = plt.subplots(len(maps), columns, figsize=(2.1 * columns, 2.2 * len(maps)), squeeze=False)
    # One colour scale for all panels, set by the matched residuals (their 99th percentile), so that
    # a mismatched prompt that is much worse saturates instead of hiding the matched maps.
    matched = torch.cat([v["residual"].flatten() for e in maps for v in e["variants"] if v["matched"]])
    vmax = float(torch.quantile(matched.double(), 0.99)) or 1.0
    shown = None
    for r, entry in enumerate(maps):
        variants = sorted(entry["variants"], key=lambda v: not v["matched"])
        axes[r][0].imshow(entry["input"].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[r][0].set_title(f"{entry['task']}: input", fontsize=8)
        axes[r][1].imshow(entry["target"].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[r][1].set_title("target", fontsize=8)
        for c, v in enumerate(variants, start=2):
            shown = axes[r][c].imshow(v["residual"].numpy(), cmap="magma", vmin=0, vmax=vmax)
            kind = "matched" if v["matched"] else (SHIFTED if v["routing_of"] == SHIFTED
                                                   else f"routing of {v['routing_of']}")
            axes[r][c].set_title(f"{kind}\n{v['psnr']:.2f} dB", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), extend="max", fraction=0.02, pad=0.01,
                     label="|restored - target| (mean over RGB)")
    fig.suptitle(title or "residuals with matched and mismatched prompts")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def analyze(model: nn.Module, dataset: Any, out_dir: str | Path, title: str = "",
            max_images: int | None = None, residuals: bool = True, progress: bool = False,
            protocol: str | Protocol | None = None) -> dict[str, Any]:
    """Everything above into ``out_dir``: ``analysis.json`` and the PNG figures; returns the JSON."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    record = collect_routing(model, dataset, max_images, progress, protocol)
    table = entropy_table(record)
    figures = [plot_entropy(table, record.num_prompts, out_dir / "entropy.png", title),
               plot_histograms(table, out_dir / "selection_histograms.png", record.dense, title),
               plot_selection_map(record, out_dir / "selection_map.png", title)]
    result: dict[str, Any] = {
        "title": title, "images": len(record.tasks), "num_prompts": record.num_prompts,
        "dense": record.dense, "top_k": int(record.indices[0].shape[1]),
        "levels": record.num_levels, "uniform_bits": math.log2(record.num_prompts),
        "entropy": table,
        "task_information": task_information(record),
        "selection": [{"task": t, "name": n,
                       "indices": [record.indices[lv][i].tolist() for lv in range(record.num_levels)],
                       "weights": [record.weights[lv][i].tolist() for lv in range(record.num_levels)]}
                      for i, (t, n) in enumerate(zip(record.tasks, record.names))],
    }
    if not record.dense:
        result["prompt_gap"] = eval_prompt_gap(model, dataset, max_images, protocol)
    if residuals:
        maps = residual_maps(model, dataset, record, protocol)
        figures.append(plot_residuals(maps, out_dir / "residuals.png", title))
        result["residuals"] = [{"task": e["task"], "name": e["name"],
                                "variants": [{k: v[k] for k in ("routing_of", "matched", "psnr",
                                                                "mean_abs_residual")}
                                             for v in e["variants"]]} for e in maps]
    result["figures"] = [p.name for p in figures]
    text = json.dumps(_finite(result), indent=1)
    atomic_write_bytes(out_dir / "analysis.json", text.encode("utf-8"))
    return result

"""Routing analysis: selection entropy (Fig. 4), selection histograms and maps (Fig. 11), residuals (Fig. 5).

``run_analysis`` makes one pass over an evaluation set, decoding images of the same size together
(``batch_size``). Every image is encoded once; that encoding is decoded with the image's own routing
(kept per prompt level: selected experts, gate weights, router softmax -- the ``RoutingRecord``) and,
for sparse routing, with every selected expert shifted to each other one (the prompt gap). The residual
maps reuse the same encodings and decodes, so no image goes through the model twice with the same
prompts. ``collect_routing`` is that pass with the routing record only. From the record:

* ``entropy_table``: per task and level, the *selection entropy* (bits; of the histogram of selected
  experts for sparse routing, of the mean softmax for dense routing) and the *mean softmax entropy*
  (bits; each image's router entropy, averaged -- the quantity of the paper's Fig. 4 for PromptIR);
* ``task_information``: per level, the mutual information between task and selected expert (pooled
  selection entropy minus the mean per-task one): low per-task entropy means consistent routing,
  this says whether different tasks are routed differently;
* ``plot_entropy``: both as bars per task and level, with ``log2 n`` (uniform) marked;
* ``plot_selection_histograms``: how often each expert is selected, per task and level (also the
  training report's histogram figure, so both read the same way);
* ``plot_selection_map``: Fig. 11's per-sample map -- one panel per level, one column per image
  (grouped by task), one row per expert, the colour the expert's gate weight (0 when unselected);
* ``prompt_gap`` (in ``analyze``'s JSON, sparse routing only): per task, the PSNR with the image's own
  prompts, the mean PSNR with every selected expert shifted to each other one, and their gap (dB) --
  the numbers of ``cpl_fast.eval.prompt_gap.eval_prompt_gap``, from the shared pass;
* ``residuals`` / ``plot_residuals``: Fig. 5 -- for one image per task (``residual_picks``: spread over
  the set, a different scene per task where the names allow), the residual ``|restored - target|``
  (restoration clipped to [0, 1], mean over channels) when decoded with its own (matched) routing, with
  the routing of each other task's pick and with every selected expert swapped for another
  (mismatched), with their PSNRs and the degraded input's.

Levels are numbered in application order (level 0 is the deepest prompt, ``prompt3`` in PromptIR).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cpl_fast.data.io import atomic_write_bytes
from cpl_fast.eval.scoring import level_statistics
from cpl_fast.figures import plot_selection_histograms, pyplot
from cpl_fast.inference.restoration import autocast, is_out_of_memory, model_multiple, pad_to_multiple, to_rgb
from cpl_fast.metrics.image import batch_psnr, psnr
from cpl_fast.metrics.protocols import Protocol, get_protocol
from cpl_fast.models import Routing
from cpl_fast.models.protocol import EncodeDecodeModel, map_state

SHIFTED = "other experts"
DEFAULT_BATCH = 8
# Images of one size are decoded together up to this many pixels, so that large test images go a few at a
# time (a batch that still runs out of memory is split in halves). On the CPU a batch larger than the
# caches is slower per image than one image at a time (the tiny model on a 2-core machine: 160 x 160
# images in eights took about twice as long per image as singly; 64 x 64 crops in eights half as long),
# so there only small images are batched.
BATCH_PIXELS = {"cpu": 8 * 64 * 64, "accelerator": 8 * 256 * 256}


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


@dataclass
class Analysis:
    """What one pass of ``run_analysis`` gives: the routing record, the prompt gap (None when not asked
    for or dense) and the residual maps (None when not asked for)."""

    record: RoutingRecord
    prompt_gap: dict[str, Any] | None
    residuals: list[dict[str, Any]] | None


def _labels(dataset: Any, count: int) -> tuple[list[str], list[str]]:
    """Task and name of the first ``count`` items: from the pair source when the dataset has one
    (``EvalDataset``, also inside ``torch.utils.data.Subset``), which needs no image loaded, else by
    reading the items."""
    from torch.utils.data import Subset

    indices, base = list(range(count)), dataset
    while isinstance(base, Subset):
        indices, base = [int(base.indices[i]) for i in indices], base.dataset
    source = getattr(base, "source", None)
    if source is not None and hasattr(source, "tasks") and hasattr(source, "names"):
        return [source.tasks[i] for i in indices], [str(source.names[i]) for i in indices]
    tasks, names = [], []
    for index in range(count):
        item = dataset[index]
        tasks.append(item["task"])
        names.append(str(item.get("name", index)))
    return tasks, names


def residual_picks(tasks: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """One image per task (in order of first appearance) for the residual maps: the t-th of T tasks
    starts t/T of the way through its own images and takes the first one (cyclically) whose name no
    earlier task took -- so where every task degrades the same clean images (the embedded set) each row
    shows another scene; when the names run out it keeps its starting image."""
    order = sorted(set(tasks), key=list(tasks).index)
    taken: set[str] = set()
    picks = {}
    for t, task in enumerate(order):
        rows = [i for i, x in enumerate(tasks) if x == task]
        start = t * len(rows) // len(order)
        ranked = rows[start:] + rows[:start]
        picks[task] = next((i for i in ranked if names[i] not in taken), ranked[0])
        taken.add(names[picks[task]])
    return picks


def _seam(model: nn.Module) -> tuple[Callable, Callable]:
    """``(encode, decode)``: the model's own split when it has one (the encoder then runs once for all
    the routings an image is decoded with), else the identity and the whole forward."""
    if isinstance(model, EncodeDecodeModel):
        return model.encode, model.decode

    def decode(x: torch.Tensor, routing: list[Routing] | None = None, return_routing: bool = False):
        if routing is None:
            return model(x, return_routing=return_routing)
        return model(x, routing=routing, return_routing=return_routing)

    return (lambda x: x), decode


def _gap_summary(positive: list[float], negative: list[float]) -> dict[str, float]:
    # The summary of cpl_fast.eval.prompt_gap.eval_prompt_gap (a test holds the two equal).
    pos = sum(positive) / len(positive)
    neg = sum(negative) / len(negative) if negative else math.nan
    return {"psnr_positive": pos, "psnr_negative": neg, "gap_db": pos - neg}


@dataclass
class _Kept:
    """A residual pick's share of the pass: its encoding (one row) and what it was decoded to."""

    state: Any
    input: torch.Tensor
    target: torch.Tensor
    own: torch.Tensor
    shifted: torch.Tensor | None
    size: tuple[int, int]


@torch.no_grad()
def run_analysis(model: nn.Module, dataset: Any, max_images: int | None = None, progress: bool = False,
                 protocol: str | Protocol | None = None, batch_size: int = DEFAULT_BATCH,
                 prompt_gap: bool = True, residuals: bool = True) -> Analysis:
    """One pass of ``model`` (eval mode) over ``dataset`` (``EvalDataset`` items): the routing record,
    and when asked the prompt gap (sparse routing only) and the residual maps (see the module
    docstring). ``protocol``: crop the inputs as that metric protocol does (None: full images);
    ``batch_size``: images of the same size decoded together (at most ``BATCH_PIXELS`` pixels: few on
    the CPU);
    ``progress``: a bar over the images (shown on terminals only)."""
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    crop = _prepare(protocol)
    model.eval()
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    if count < 1:
        raise ValueError("the dataset is empty: nothing to analyse")
    tasks, names = _labels(dataset, count)
    picks = residual_picks(tasks, names) if residuals else {}
    keep = set(picks.values())
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    multiple = model_multiple(model)
    encode, decode = _seam(model)
    pixels = BATCH_PIXELS["cpu" if device.type == "cpu" else "accelerator"]

    routing: list[list[Routing] | None] = [None] * count      # per image, one-row routing per level
    scores: dict[int, tuple[float, list[float]]] = {}         # per image: own PSNR, shifted PSNRs
    kept: dict[int, _Kept] = {}
    gap = {"wanted": prompt_gap}                              # decided on the first batch (dense: no)

    def restored(out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return (out.float() if out.dtype in (torch.float16, torch.bfloat16) else out)[..., :h, :w].cpu()

    def run(batch: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        x = to_rgb(torch.stack([image for _, image, _ in batch])).to(device, dtype)
        padded, (h, w) = pad_to_multiple(x, multiple)
        with autocast(device, "auto"):
            state = encode(padded)
            out, used = decode(state, None, True)
        used = list(used)
        if any(r.probs is None for r in used):
            raise ValueError("the model returned a routing without router probabilities")
        own = restored(out, h, w)
        n = int(used[0].probs.shape[1])
        if gap["wanted"] and used[0].indices.shape[1] == n:
            gap["wanted"] = False
        shifted = []
        if gap["wanted"]:
            targets = torch.stack([target for _, _, target in batch])
            positive = batch_psnr(own, targets)
            # CPR's mismatched_experts negatives: every selected expert moved by s, all levels at once.
            for s in range(1, n):
                with autocast(device, "auto"):
                    out = decode(state, [Routing((r.indices + s) % n, r.weights) for r in used])
                shifted.append(restored(out, h, w))
            negatives = torch.stack([batch_psnr(image, targets) for image in shifted], dim=1)
        for row, (index, image, target) in enumerate(batch):
            routing[index] = [Routing(r.indices[row:row + 1].cpu(), r.weights[row:row + 1].float().cpu(),
                                      r.probs[row:row + 1].double().cpu()) for r in used]
            if gap["wanted"]:
                scores[index] = (float(positive[row]), [float(v) for v in negatives[row]])
            if index in keep:
                # Cloned: a view would keep the whole batch's encoding alive.
                one = map_state(lambda t, row=row: t[row:row + 1].clone(), state)
                kept[index] = _Kept(one, image, target, own[row:row + 1],
                                    shifted[0][row:row + 1] if shifted else None, (h, w))

    def run_or_split(batch: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        try:
            run(batch)
        except Exception as exc:  # noqa: BLE001 - only memory errors are retried, the rest re-raised
            if len(batch) == 1 or not is_out_of_memory(exc):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            run_or_split(batch[:len(batch) // 2])
            run_or_split(batch[len(batch) // 2:])
            return
        bar.update(len(batch))

    buckets: dict[tuple[int, ...], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    # disable=None: tqdm shows the bar on terminals only (not in logs or pipes).
    bar = tqdm(total=count, desc="analysis", unit="image", leave=False, disable=None if progress else True)
    try:
        for index in range(count):
            item = dataset[index]
            if item["task"] != tasks[index]:
                raise ValueError(f"item {index}: task {item['task']!r}, but the dataset's source lists "
                                 f"{tasks[index]!r}")
            image, target = crop(item["input"]), crop(item["target"])
            bucket = buckets.setdefault(tuple(image.shape), [])
            bucket.append((index, image, target))
            if len(bucket) >= max(1, min(batch_size, pixels // (image.shape[-2] * image.shape[-1]))):
                run_or_split(buckets.pop(tuple(image.shape)))
        for bucket in buckets.values():
            run_or_split(bucket)
    finally:
        bar.close()

    levels = len(routing[0])
    record = RoutingRecord(tasks, names, *[[torch.cat([routing[i][lv][part] for i in range(count)])
                                             for lv in range(levels)] for part in range(3)])
    gap_table = None
    if gap["wanted"]:
        per_task: dict[str, tuple[list[float], list[float]]] = {}
        for index in range(count):  # image order, as eval_prompt_gap sums them
            positive, negative = per_task.setdefault(tasks[index], ([], []))
            positive.append(scores[index][0])
            negative.extend(scores[index][1])
        gap_table = {task: _gap_summary(*s) for task, s in sorted(per_task.items())}
        gap_table["all"] = _gap_summary([v for s in per_task.values() for v in s[0]],
                                        [v for s in per_task.values() for v in s[1]])
    maps = _residual_maps(decode, record, picks, kept, device) if residuals else None
    return Analysis(record, gap_table, maps)


def _residual_maps(decode: Callable, record: RoutingRecord, picks: Mapping[str, int],
                   kept: Mapping[int, _Kept], device: torch.device) -> list[dict[str, Any]]:
    """Per task, its pick decoded with its own routing (from the pass), with each other task's pick's
    routing and with its experts swapped for others (``SHIFTED``, from the pass when the prompt gap
    decoded it); the decodes one pick still needs go in one batch."""
    n = record.num_prompts

    def row(index: int) -> list[Routing]:
        return [Routing(record.indices[lv][index:index + 1], record.weights[lv][index:index + 1])
                for lv in range(record.num_levels)]

    out = []
    for task, index in picks.items():
        pick = kept[index]
        others = [source for source in picks if source != task]
        wanted = [row(picks[source]) for source in others]
        if pick.shifted is None:
            # Mismatched prompts as CPR's default sampler makes them: every selected expert swapped for
            # the next one (cyclically) with the same gate weight; for dense routing this rolls the
            # weights over the experts.
            wanted.append([Routing((r.indices + 1) % n, r.weights) for r in row(index)])
        decoded: dict[str, torch.Tensor] = {task: pick.own}
        if wanted:
            size = len(wanted)
            routing = [Routing(torch.cat([w[lv].indices for w in wanted]).to(device),
                               torch.cat([w[lv].weights for w in wanted]).to(device))
                       for lv in range(record.num_levels)]
            state = map_state(lambda t, size=size: t.expand(size, *t.shape[1:]).contiguous(), pick.state)
            with autocast(device, "auto"):
                images = decode(state, routing)
            h, w = pick.size
            images = (images.float() if images.dtype in (torch.float16, torch.bfloat16) else images)
            images = images[..., :h, :w].cpu()
            decoded.update({source: images[i:i + 1] for i, source in enumerate(others)})
            if pick.shifted is None:
                decoded[SHIFTED] = images[-1:]
        if pick.shifted is not None:
            decoded[SHIFTED] = pick.shifted
        target = pick.target.unsqueeze(0)
        entry: dict[str, Any] = {"task": task, "name": record.names[index], "input": pick.input,
                                 "target": pick.target, "input_psnr": psnr(pick.input.unsqueeze(0), target),
                                 "variants": []}
        for source in [*picks, SHIFTED]:
            image = decoded[source].clamp(0.0, 1.0)
            residual = (image - target).abs().mean(dim=1)[0]
            entry["variants"].append({"routing_of": source, "matched": source == task,
                                      "psnr": psnr(image, target),
                                      "mean_abs_residual": float(residual.mean()), "residual": residual})
        out.append(entry)
    return out


def collect_routing(model: nn.Module, dataset: Any, max_images: int | None = None,
                    progress: bool = False, protocol: str | Protocol | None = None,
                    batch_size: int = DEFAULT_BATCH) -> RoutingRecord:
    """The routing record of ``run_analysis`` alone (no prompt gap, no residuals)."""
    return run_analysis(model, dataset, max_images, progress, protocol, batch_size,
                        prompt_gap=False, residuals=False).record


def entropy_table(record: RoutingRecord) -> dict[str, list[dict[str, Any]]]:
    """Per task: per level ``selection_entropy``, ``mean_softmax_entropy``, ``counts``, ``mean_probs``."""
    table = {}
    for task in record.task_order():
        rows = record.rows(task)
        table[task] = [level_statistics(record.indices[lv][rows], record.probs[lv][rows], record.dense)
                       for lv in range(record.num_levels)]
    return table


def task_information(record: RoutingRecord, table: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
                     ) -> list[dict[str, float]]:
    """Per level: the pooled selection entropy over all images, the image-weighted mean of the per-task
    selection entropies, and their difference -- the mutual information (bits) between the task and
    the selected expert (for dense routing: of the mean softmax distributions). 0 bits: the routing
    carries no information about the task (e.g. every image uses the same expert). ``table``: the
    record's ``entropy_table`` when already computed."""
    table = entropy_table(record) if table is None else table
    sizes = {task: len(record.rows(task)) for task in table}
    total = sum(sizes.values())
    out = []
    for lv in range(record.num_levels):
        pooled = level_statistics(record.indices[lv], record.probs[lv], record.dense)["selection_entropy"]
        within = sum(sizes[t] * table[t][lv]["selection_entropy"] for t in table) / total
        out.append({"pooled_selection_entropy": pooled, "mean_task_selection_entropy": within,
                    "task_expert_information": max(0.0, pooled - within)})
    return out


def plot_entropy(table: Mapping[str, Sequence[Mapping[str, Any]]], num_prompts: int, path: Path,
                 title: str = "") -> Path:
    """Bars of selection and mean softmax entropy per task and level (Fig. 4's measure)."""
    plt = pyplot()
    tasks = list(table)
    levels = len(next(iter(table.values())))
    uniform = math.log2(num_prompts)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(tasks)), 4.2), sharey=True)
    width = 0.8 / levels
    top = max([uniform] + [table[t][lv][key] for t in tasks for lv in range(levels)
                           for key in ("selection_entropy", "mean_softmax_entropy")])
    for ax, key, name in zip(axes, ("selection_entropy", "mean_softmax_entropy"),
                             ("selection entropy", "mean per-image softmax entropy")):
        for lv in range(levels):
            xs = np.arange(len(tasks)) + (lv - (levels - 1) / 2) * width
            ax.bar(xs, [table[t][lv][key] for t in tasks], width, label=f"level {lv}", color=f"C{lv}")
        ax.axhline(uniform, color="k", ls="--", lw=1, label=f"log2 {num_prompts} = {uniform:.2f} (uniform)")
        ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
        ax.set(title=name, ylabel="bits", ylim=(0, 1.08 * top if top > 0 else 1.0))
        ax.grid(axis="y", alpha=0.3)
    # Below the panels: inside, the legend would cover the bars that reach the uniform line.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=levels + 1, fontsize=8, frameon=False)
    fig.suptitle(f"{title}: prompt-selection entropy" if title else "prompt-selection entropy")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection_map(record: RoutingRecord, path: Path, title: str = "") -> Path:
    """Fig. 11: per level, experts (rows) x images grouped by task (columns), coloured by gate weight."""
    plt = pyplot()
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


def plot_residuals(maps: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Rows: tasks; columns: input, target, then residuals with each task's routing (matched first)."""
    plt = pyplot()
    columns = 2 + len(maps[0]["variants"])
    # Constrained layout: the title sits just above the first row (not an inch of white above it).
    fig, axes = plt.subplots(len(maps), columns, figsize=(2.1 * columns, 2.3 * len(maps)), squeeze=False,
                             layout="constrained")
    # One colour scale for all panels, set by the matched residuals (their 99th percentile), so that
    # a mismatched prompt that is much worse saturates instead of hiding the matched maps.
    matched = torch.cat([v["residual"].flatten() for e in maps for v in e["variants"] if v["matched"]])
    vmax = float(torch.quantile(matched.double(), 0.99)) or 1.0
    shown = None
    for r, entry in enumerate(maps):
        variants = sorted(entry["variants"], key=lambda v: not v["matched"])
        axes[r][0].imshow(entry["input"].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[r][0].set_title(f"{entry['task']}: {entry['name']}\ninput {entry['input_psnr']:.2f} dB",
                             fontsize=8)
        axes[r][1].imshow(entry["target"].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[r][1].set_title("target", fontsize=8)
        for c, v in enumerate(variants, start=2):
            shown = axes[r][c].imshow(v["residual"].numpy(), cmap="magma", vmin=0, vmax=vmax)
            if v["matched"]:
                text = f"matched\n{v['psnr']:.2f} dB ({v['psnr'] - entry['input_psnr']:+.2f})"
            else:
                kind = SHIFTED if v["routing_of"] == SHIFTED else f"routing of {v['routing_of']}"
                text = f"{kind}\n{v['psnr']:.2f} dB"
            axes[r][c].set_title(text, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), extend="max", fraction=0.02, pad=0.01,
                     label="|restored - target| (mean over RGB)")
    what = "residuals with matched and mismatched prompts (PSNR vs target; in brackets: gain over the input)"
    fig.suptitle(f"{title}: {what}" if title else what)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def analyze(model: nn.Module, dataset: Any, out_dir: str | Path, title: str = "",
            max_images: int | None = None, residuals: bool = True, progress: bool = False,
            protocol: str | Protocol | None = None, batch_size: int = DEFAULT_BATCH) -> dict[str, Any]:
    """Everything above into ``out_dir``: ``analysis.json`` and the PNG figures; returns the JSON."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = run_analysis(model, dataset, max_images, progress, protocol, batch_size,
                            prompt_gap=True, residuals=residuals)
    record = analysis.record
    table = entropy_table(record)
    figures = [plot_entropy(table, record.num_prompts, out_dir / "entropy.png", title),
               plot_selection_histograms({title: table}, out_dir / "selection_histograms.png", title),
               plot_selection_map(record, out_dir / "selection_map.png", title)]
    result: dict[str, Any] = {
        "title": title, "images": len(record.tasks), "num_prompts": record.num_prompts,
        "dense": record.dense, "top_k": int(record.indices[0].shape[1]),
        "levels": record.num_levels, "uniform_bits": math.log2(record.num_prompts),
        "entropy": table,
        "task_information": task_information(record, table),
        "selection": [{"task": t, "name": n,
                       "indices": [record.indices[lv][i].tolist() for lv in range(record.num_levels)],
                       "weights": [record.weights[lv][i].tolist() for lv in range(record.num_levels)]}
                      for i, (t, n) in enumerate(zip(record.tasks, record.names))],
    }
    if analysis.prompt_gap is not None:
        result["prompt_gap"] = analysis.prompt_gap
    if analysis.residuals is not None:
        figures.append(plot_residuals(analysis.residuals, out_dir / "residuals.png", title))
        result["residuals"] = [{"task": e["task"], "name": e["name"], "input_psnr": e["input_psnr"],
                                "variants": [{k: v[k] for k in ("routing_of", "matched", "psnr",
                                                                "mean_abs_residual")}
                                             for v in e["variants"]]} for e in analysis.residuals]
    result["figures"] = [p.name for p in figures]
    text = json.dumps(_finite(result), indent=1)
    atomic_write_bytes(out_dir / "analysis.json", text.encode("utf-8"))
    return result

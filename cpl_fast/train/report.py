"""The run report: per-task scores and prompt-selection entropies before/after training, as text,
markdown and matplotlib figures (loss curves, PSNR per task, selection histograms).

A report compares runs trained the same way (the main run and its ``baselines``); each run is a
``RunResult``. Entropy conventions (stated in the report): the *selection entropy* is the entropy
of the average selection distribution of a level over a task's images (sparse routing: the
histogram of selected experts; dense routing: the mean softmax), so 0 bits means every image of the
task uses the same expert and ``log2 n`` means the experts are used evenly; the *mean softmax
entropy* averages each image's own router entropy (how peaked one decision is).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cpl_fast.data.io import atomic_write_bytes


@dataclass
class RunResult:
    """What one trained run contributes to a report (also stored as ``result.json`` in its folder)."""

    name: str
    model: str                      # model preset
    k: int | None                   # None: dense
    objective: str
    steps: int
    wall_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    # Why ``after`` is empty: "no test split", "eval.before_after is false", ...
    not_evaluated: str = ""
    validations: list[dict[str, float]] = field(default_factory=list)  # eval.every: one per validation

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, json.dumps(asdict(self), indent=1).encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def _routing_kind(run: RunResult) -> str:
    return "dense (softmax over all experts)" if run.k is None else f"sparse (top-{run.k})"


def summary_text(runs: Sequence[RunResult]) -> str:
    """A plain-text summary: per run and task, PSNR/SSIM and entropies before -> after."""
    lines = ["selection entropy: entropy of the average selection distribution of a level over a task's "
             "images (sparse: histogram of selected experts; dense: mean softmax); per-image softmax "
             "entropies are in report.md"]
    for run in runs:
        lines.append(f"== {run.name}: model {run.model}, {_routing_kind(run)}, objective {run.objective}, "
                     f"{run.steps} steps, {run.wall_s:.0f} s")
        if not run.after:
            lines.append(f"   (nothing evaluated: {run.not_evaluated or 'no test split'})")
            continue
        lines.append(f"   {'task':<12} {'PSNR before':>11} {'after':>7} {'SSIM before':>11} {'after':>7}   "
                     f"selection entropy per level, bits (before -> after)")
        for task, after in run.after.items():
            before = run.before.get(task)
            levels_before = before["levels"] if before else after["levels"]
            ent = "  ".join(
                f"L{i}: {b['selection_entropy']:.2f}->{a['selection_entropy']:.2f}" if before else
                f"L{i}: {a['selection_entropy']:.2f}"
                for i, (b, a) in enumerate(zip(levels_before, after["levels"])))
            pb = f"{before['psnr']:.2f}" if before else "-"
            sb = f"{before['ssim']:.4f}" if before else "-"
            scores = f"{pb:>11} {after['psnr']:>7.2f} {sb:>11} {after['ssim']:>7.4f}"
            lines.append(f"   {task:<12} {scores}   {ent}")
    lines += standing(runs)
    return "\n".join(lines)


def _average_psnr(scores: Mapping[str, Any]) -> float | None:
    values = [s["psnr"] for s in scores.values()]
    return sum(values) / len(values) if values else None


def standing(runs: Sequence[RunResult]) -> list[str]:
    """Where the main run (the first) stands: average PSNR against its start and against each other run."""
    if not runs or not runs[0].after:
        return []
    main = runs[0]
    after, before = _average_psnr(main.after), _average_psnr(main.before) if main.before else None
    lines = []
    if before is not None:
        verdict = "above" if after > before else "BELOW"
        lines.append(f"-> {main.name}: average PSNR {before:.2f} -> {after:.2f} dB ({after - before:+.2f}), "
                     f"{verdict} its starting point")
    for other in runs[1:]:
        theirs = _average_psnr(other.after) if other.after else None
        if theirs is not None:
            lines.append(f"-> {main.name} vs {other.name}: {after:.2f} vs {theirs:.2f} dB average PSNR "
                         f"({after - theirs:+.2f} dB)")
    return lines


def _last_health(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The newest value of each training-health signal in a run's history."""
    found: dict[str, float] = {}
    for entry in reversed(history):
        for key, value in entry.items():
            healthy = (key in ("prompt_gap", "grad_ratio")
                       or key.startswith(("usage_entropy_l", "task_info_l")))
            if healthy and key not in found and value is not None and math.isfinite(value):
                found[key] = value
    return dict(sorted(found.items()))


def _markdown(runs: Sequence[RunResult], title: str, notes: Sequence[str]) -> str:
    out = [f"# {title}", ""]
    out += [f"{note}" for note in notes] + [""]
    out += [line[3:] + "  " for line in standing(runs)] + [""]
    out += ["Selection entropy: entropy (bits) of the average selection distribution of a prompt level "
            "over a task's test images: for sparse routing the histogram of selected experts, for dense "
            "routing the mean softmax. 0 bits: every image of the task uses the same expert; log2(n) bits: "
            "all experts equally. Mean softmax entropy: the router's per-image softmax entropy, averaged "
            "(how peaked each decision is).", ""]
    for run in runs:
        out += [f"## {run.name}", "",
                f"Model `{run.model}`, {_routing_kind(run)}, objective `{run.objective}`, {run.steps} "
                f"optimiser steps, {run.wall_s:.0f} s of training.", ""]
        if run.history:
            first, last = run.history[0], run.history[-1]
            out += [f"Training loss: {first['loss']:.4f} at step {int(first['step'])}, {last['loss']:.4f} at "
                    f"step {int(last['step'])} (L1 {first['l1']:.4f} -> {last['l1']:.4f}).", ""]
            health = _last_health(run.history)
            if health:
                out += ["Training health at the end (docs/CPR.md): "
                        + ", ".join(f"{key} {value:.2f}" for key, value in health.items()) + ".", ""]
        if not run.after:
            out += [f"Nothing evaluated: {run.not_evaluated or 'no test split'}.", ""]
            continue
        out += ["| task | images | PSNR before | PSNR after | SSIM before | SSIM after |",
                "|---|---|---|---|---|---|"]
        for task, after in run.after.items():
            before = run.before.get(task, {})
            out.append(f"| {task} | {after['images']} | {before.get('psnr', math.nan):.2f} | "
                       f"{after['psnr']:.2f} | {before.get('ssim', math.nan):.4f} | {after['ssim']:.4f} |")
        out += ["", "| task | level | selection entropy before | after | mean softmax entropy before "
                "| after |", "|---|---|---|---|---|---|"]
        for task, after in run.after.items():
            before = run.before.get(task, {"levels": [{}] * len(after["levels"])})
            for i, (b, a) in enumerate(zip(before["levels"], after["levels"])):
                out.append(f"| {task} | {i} | {b.get('selection_entropy', math.nan):.3f} | "
                           f"{a['selection_entropy']:.3f} | {b.get('mean_softmax_entropy', math.nan):.3f} | "
                           f"{a['mean_softmax_entropy']:.3f} |")
        out.append("")
    out += ["## Figures", "", "![loss curves](loss_curves.png)", "",
            "![PSNR per task](psnr_per_task.png)", "",
            "![selection histograms](selection_histograms.png)", ""]
    return "\n".join(out)


def _selection(level: Mapping[str, Any]) -> list[float]:
    """The average selection distribution of a level (normalised counts, or mean softmax when dense)."""
    values = level["mean_probs"] if level["dense"] else level["counts"]
    total = sum(values)
    return [v / total for v in values] if total > 0 else values


def write_figures(runs: Sequence[RunResult], folder: Path) -> list[Path]:
    """``loss_curves.png``, ``psnr_per_task.png``, ``selection_histograms.png`` in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps = [h["step"] for h in run.history]
        axes[0].plot(steps, [h["loss"] for h in run.history], label=f"{run.name} ({run.objective})")
        axes[1].plot(steps, [h["l1"] for h in run.history], label=run.name)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="L1 term", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(folder / "loss_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    evaluated = [run for run in runs if run.after]
    tasks = sorted({task for run in evaluated for task in run.after})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 4))
    width = 0.8 / max(1, 2 * len(evaluated))
    for r, run in enumerate(evaluated):
        for s, (stage, data) in enumerate((("before", run.before), ("after", run.after))):
            offset = (2 * r + s) * width - 0.4 + width / 2
            ax.bar([i + offset for i in range(len(tasks))], [data.get(t, {}).get("psnr", 0.0) for t in tasks],
                   width, label=f"{run.name} {stage}", alpha=0.55 if stage == "before" else 1.0)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel="PSNR (dB)", title="PSNR per task, before and after training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "psnr_per_task.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    levels = max((len(next(iter(run.after.values()))["levels"]) for run in evaluated), default=1)
    fig, axes = plt.subplots(max(1, len(evaluated)), levels, figsize=(4 * levels, 3 * max(1, len(evaluated))),
                             squeeze=False)
    for r, run in enumerate(evaluated):
        for level in range(levels):
            ax = axes[r][level]
            bar_width = 0.8 / max(1, len(run.after))
            for t, (task, data) in enumerate(run.after.items()):
                dist = _selection(data["levels"][level])
                ax.bar([e + t * bar_width - 0.4 + bar_width / 2 for e in range(len(dist))], dist, bar_width,
                       label=task)
            ax.set(title=f"{run.name}: level {level} (after)", xlabel="expert", ylabel="share")
            if level == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "selection_histograms.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def write_report(runs: Sequence[RunResult], folder: str | Path, title: str = "cpl-train report",
                 notes: Sequence[str] = ()) -> Path:
    """Write ``report.md`` and its figures into ``folder``; returns the markdown's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_figures(runs, folder)
    path = folder / "report.md"
    atomic_write_bytes(path, _markdown(runs, title, notes).encode("utf-8"))
    return path

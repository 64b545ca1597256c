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
from cpl_fast.tables import markdown_table


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
    inputs: dict[str, Any] = field(default_factory=dict)  # the degraded inputs' own scores, per task

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
        scores = []
        for task, after in run.after.items():
            was = run.before.get(task, {})
            scores.append([task, after["images"], f"{was.get('psnr', math.nan):.2f}", f"{after['psnr']:.2f}",
                           f"{was.get('ssim', math.nan):.4f}", f"{after['ssim']:.4f}"])
        out += [markdown_table(["task", "images", "PSNR before", "PSNR after", "SSIM before", "SSIM after"],
                               scores), ""]
        entropies = []
        for task, after in run.after.items():
            before = run.before.get(task, {"levels": [{}] * len(after["levels"])})
            for i, (b, a) in enumerate(zip(before["levels"], after["levels"])):
                entropies.append([task, i, f"{b.get('selection_entropy', math.nan):.3f}",
                                  f"{a['selection_entropy']:.3f}",
                                  f"{b.get('mean_softmax_entropy', math.nan):.3f}",
                                  f"{a['mean_softmax_entropy']:.3f}"])
        out += [markdown_table(["task", "level", "selection entropy before", "after",
                                "mean softmax entropy before", "after"], entropies)]
        out.append("")
    out += ["## Figures", "", "![loss curves](loss_curves.png)", "",
            "![PSNR per task](psnr_per_task.png)", "",
            "![selection histograms](selection_histograms.png)", ""]
    return "\n".join(out)


# The loss terms a run's history records (cpl_fast.train.trainer: train_step), one panel each, in this
# order; a term a run does not have (an L1-only run records 0 for the CPR terms) is left out of it.
LOSS_PANELS = (("loss", "total loss"), ("l1", "L1 reconstruction"), ("cpr", "CPR term (alpha x regulariser)"),
               ("l_pos", "L_pos: restored vs target features"), ("l_neg", "L_neg: negatives vs restored"),
               ("router_aux", "router load-balancing term"))


def _placeholder(plt, text: str):
    """A small figure saying why there is nothing to draw (instead of empty axes)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def _not_evaluated(runs: Sequence[RunResult]) -> str:
    reasons = dict.fromkeys(run.not_evaluated or "no test split" for run in runs if not run.after)
    return "nothing evaluated: " + ("; ".join(reasons) or "no runs")


def smooth(values: Sequence[float]) -> list[float]:
    """Debiased exponential moving average with a span of about a tenth of the curve (short curves
    stay raw): the trend of a noisy per-step loss without the lag of an undebiased start."""
    span = max(1, len(values) // 10)
    decay = 1.0 - 2.0 / (span + 1)
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = decay * average + (1.0 - decay) * value
        out.append(average / (1.0 - decay ** i))
    return out


def _curve(run: RunResult, key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of one history key, finite entries only; empty when the run never had the
    term (absent, or 0 at every step)."""
    pairs = [(h["step"], h[key]) for h in run.history
             if h.get(key) is not None and math.isfinite(h[key]) and "step" in h]
    if not any(value != 0 for _, value in pairs):
        return [], []
    return [s for s, _ in pairs], [v for _, v in pairs]


def loss_figure(runs: Sequence[RunResult]):
    """One panel per loss term some run recorded (``LOSS_PANELS``): raw per-step values faint, the
    ``smooth`` trend solid, one colour per run; the legend below the panels."""
    from cpl_fast.figures import pyplot

    plt = pyplot()
    panels = [(key, name) for key, name in LOSS_PANELS if any(_curve(run, key)[0] for run in runs)]
    if not panels:
        return _placeholder(plt, "no training history recorded")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.1 * rows + 0.5), squeeze=False)
    for ax, (key, name) in zip(axes.ravel(), panels):
        for r, run in enumerate(runs):
            steps, values = _curve(run, key)
            if not steps:
                continue
            ax.plot(steps, values, color=f"C{r}", alpha=0.25, lw=0.8)
            ax.plot(steps, smooth(values), color=f"C{r}", lw=1.6, label=f"{run.name} ({run.objective})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.set_axis_off()
    labels = {}
    for ax in axes.ravel()[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=min(4, len(labels)), fontsize=8,
               frameon=False, title="solid: moving average; faint: every step", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))  # the legend's strip, in inches
    return fig


def _psnr_range(values: Sequence[float]) -> tuple[float, float]:
    """A y range around the bars' values: bars that all sit near 25-35 dB would differ by a few pixels
    on an axis from 0; the margin keeps the smallest visible and leaves room above the largest."""
    lo, hi = min(values), max(values)
    pad = max(0.5, 0.12 * (hi - lo))
    return max(0.0, lo - 2 * pad), hi + pad


def psnr_figure(runs: Sequence[RunResult], inputs: Mapping[str, Mapping[str, Any]] | None = None):
    """PSNR per task: the degraded inputs' (when given: ``cpl_fast.eval.scoring.score_inputs`` on the
    test set) beside every evaluated run's before (faint) and after training; the y axis spans the data."""
    from cpl_fast.figures import pyplot

    plt = pyplot()
    evaluated = [run for run in runs if run.after]
    tasks = sorted({task for run in evaluated for task in run.after} | set(inputs or {}))
    series = []  # (label, {task: psnr}, style)
    if inputs:
        series.append(("degraded input", {t: s["psnr"] for t, s in inputs.items()},
                       {"color": "0.6", "hatch": "//", "edgecolor": "0.35"}))
    for r, run in enumerate(evaluated):
        if run.before:
            series.append((f"{run.name} before", {t: s["psnr"] for t, s in run.before.items()},
                           {"color": f"C{r}", "alpha": 0.4}))
        series.append((f"{run.name} after", {t: s["psnr"] for t, s in run.after.items()}, {"color": f"C{r}"}))
    if not series:
        return _placeholder(plt, _not_evaluated(runs))
    fig, ax = plt.subplots(figsize=(max(6.5, 0.34 * len(series) * len(tasks) + 2), 4.4))
    width = 0.8 / max(1, len(series))
    shown = []
    for s, (label, scores, style) in enumerate(series):
        xs = [i + (s - (len(series) - 1) / 2) * width for i, t in enumerate(tasks)
              if scores.get(t) is not None and math.isfinite(scores[t])]
        heights = [scores[t] for t in tasks if scores.get(t) is not None and math.isfinite(scores[t])]
        bars = ax.bar(xs, heights, width, label=label, **style)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        shown += heights
    ax.set_xticks(range(len(tasks)), tasks, rotation=20 if len(tasks) > 4 else 0,
                  ha="right" if len(tasks) > 4 else "center")
    if shown:
        ax.set_ylim(*_psnr_range(shown))
    ax.set(ylabel="PSNR (dB)", title="PSNR per task: " + ("degraded input, " if inputs else "")
           + "before and after training")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16 if len(tasks) > 4 else -0.1),
              ncol=min(5, max(1, len(series))), frameon=False)
    fig.tight_layout()
    return fig


def write_figures(runs: Sequence[RunResult], folder: Path,
                  inputs: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """``loss_curves.png`` (``loss_figure``), ``psnr_per_task.png`` (``psnr_figure``; ``inputs``: the
    degraded inputs' per-task scores) and ``selection_histograms.png`` (the histogram layout of
    ``cpl-analyze``: one row per evaluated run and level, one column per task) in ``folder``."""
    from cpl_fast.figures import plot_selection_histograms, pyplot

    plt = pyplot()
    paths = []
    for name, fig in (("loss_curves.png", loss_figure(runs)),
                      ("psnr_per_task.png", psnr_figure(runs, inputs))):
        paths.append(folder / name)
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    # Runs with scores and routing statistics (a model without prompts records no levels).
    tables = {run.name: {task: scores["levels"] for task, scores in run.after.items() if scores["levels"]}
              for run in runs if run.after}
    evaluated = {name: table for name, table in tables.items() if table}
    paths.append(folder / "selection_histograms.png")
    if evaluated:
        plot_selection_histograms(evaluated, paths[-1], title="after training")
    else:
        fig = _placeholder(plt, _not_evaluated(runs))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_report(runs: Sequence[RunResult], folder: str | Path, title: str = "cpl-train report",
                 notes: Sequence[str] = ()) -> Path:
    """Write ``report.md`` and its figures into ``folder``; returns the markdown's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_figures(runs, folder, inputs=next((run.inputs for run in runs if run.inputs), None))
    path = folder / "report.md"
    atomic_write_bytes(path, _markdown(runs, title, notes).encode("utf-8"))
    return path

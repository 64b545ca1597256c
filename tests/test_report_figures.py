"""The training report's figures: loss panels per recorded term, PSNR bars with the degraded inputs on
an axis around the data, and the selection histograms drawn by cpl-analyze's function."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from cpl_fast import figures
from cpl_fast.train.report import LOSS_PANELS, RunResult, loss_figure, psnr_figure, smooth, write_figures

TASKS = ("dehaze", "denoise_25", "derain")


def _levels(dense: bool, counts=(3.0, 1.0, 0.0)) -> list[dict]:
    probs = [0.5, 0.3, 0.2]
    return [{"dense": dense, "counts": list(counts), "mean_probs": probs, "selection_entropy": 1.0,
             "mean_softmax_entropy": 1.4} for _ in range(2)]


def _scores(base: float, dense: bool = False) -> dict:
    return {task: {"images": 4, "psnr": base + i, "ssim": 0.9, "levels": _levels(dense)}
            for i, task in enumerate(TASKS)}


def _history(steps: int, cpr: bool, aux: bool = False) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        l1 = 0.1 / s + 0.01 * (s % 3)
        entry = {"step": s, "l1": l1, "cpr": 0.0, "l_pos": 0.0, "l_neg": 0.0, "alpha": 0.0, "lr": 1e-3,
                 "seconds": 0.1, "images_per_s": 10.0}
        if cpr:
            entry.update(cpr=0.002 + 0.001 * (s % 2), l_pos=50.0 / s, l_neg=30.0 + s, alpha=1e-4)
        if aux:
            entry["router_aux"] = 0.01
        entry["loss"] = entry["l1"] + entry["cpr"] + entry.get("router_aux", 0.0)
        out.append(entry)
    return out


def _runs() -> list[RunResult]:
    return [RunResult("cpl", "tiny", 1, "fast", 60, 10.0, _history(60, cpr=True), _scores(27.0),
                      _scores(29.0)),
            RunResult("dense", "tiny_dense", None, "l1", 60, 8.0, _history(60, cpr=False),
                      _scores(27.5, True), _scores(28.2, True))]


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_loss_panels_follow_the_recorded_terms():
    names = dict(LOSS_PANELS)
    fig = loss_figure(_runs())
    assert _titles(fig) == [names[k] for k in ("loss", "l1", "cpr", "l_pos", "l_neg")]
    # The L1-only run records 0 for the CPR terms: it has no line there; the CPR run has.
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert len(by_title[names["l_pos"]].lines) == 2          # raw + smoothed, one run
    assert len(by_title[names["l1"]].lines) == 4             # both runs
    raw, trend = by_title[names["l_neg"]].lines
    assert raw.get_alpha() < 1 and trend.get_alpha() in (None, 1)
    assert list(trend.get_ydata()) == pytest.approx(smooth(list(raw.get_ydata())))
    # Only L1 training: no CPR panels at all; a router term gets its panel.
    l1_only = [RunResult("l1", "tiny", 1, "l1", 30, 1.0, _history(30, cpr=False, aux=True))]
    assert _titles(loss_figure(l1_only)) == [names["loss"], names["l1"], names["router_aux"]]
    empty = loss_figure([RunResult("x", "tiny", 1, "l1", 0, 0.0)])
    assert "no training history" in empty.axes[0].texts[0].get_text()


def test_smooth_keeps_levels_and_follows_the_trend():
    assert smooth([2.0] * 50) == pytest.approx([2.0] * 50)     # debiased: no ramp from 0
    assert smooth([1.0, 5.0, 3.0]) == [1.0, 5.0, 3.0]           # short curves stay raw
    noisy = [float(i % 2) for i in range(200)]
    trend = smooth(noisy)
    assert max(trend[50:]) - min(trend[50:]) < 0.3 < max(noisy) - min(noisy)
    step = smooth([0.0] * 100 + [1.0] * 100)
    assert step[99] == 0.0 and 0.0 < step[101] < 1.0 and step[-1] == pytest.approx(1.0, abs=1e-3)


def test_psnr_axis_spans_the_data_with_the_inputs_beside_the_runs():
    inputs = {task: {"psnr": 24.0 + i} for i, task in enumerate(TASKS)}
    fig = psnr_figure(_runs(), inputs)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    values = [b.get_height() for c in ax.containers for b in c]
    assert 0 < lo < min(values) and hi > max(values)           # not from 0: all PSNRs are above 20 dB
    bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert list(bars) == ["degraded input", "cpl before", "cpl after", "dense before", "dense after"]
    assert bars["degraded input"] == [24.0, 25.0, 26.0]
    assert bars["cpl after"] == [29.0, 30.0, 31.0]
    # Each task's input bar is the leftmost of its group.
    centres = {c.get_label(): [b.get_x() + b.get_width() / 2 for b in c] for c in ax.containers}
    for t in range(len(TASKS)):
        assert centres["degraded input"][t] == min(xs[t] for xs in centres.values())
    assert "degraded input" not in {c.get_label() for c in psnr_figure(_runs()).axes[0].containers}
    # Low PSNRs: the axis stays at or above 0.
    low = [RunResult("x", "tiny", 1, "l1", 1, 0.0, after={t: {"psnr": 0.5, "levels": []} for t in TASKS})]
    assert psnr_figure(low).axes[0].get_ylim()[0] == 0.0


def test_write_figures_uses_the_histogram_function_of_cpl_analyze(tmp_path, monkeypatch):
    calls = []
    original = figures.plot_selection_histograms

    def spy(runs, path, title=""):
        calls.append(dict(runs))
        return original(runs, path, title)

    monkeypatch.setattr(figures, "plot_selection_histograms", spy)
    paths = write_figures(_runs(), tmp_path, inputs={t: {"psnr": 20.0} for t in TASKS})
    assert [p.name for p in paths] == ["loss_curves.png", "psnr_per_task.png", "selection_histograms.png"]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) > 200
    assert len(calls) == 1 and list(calls[0]) == ["cpl", "dense"]
    assert calls[0]["cpl"]["derain"] == _scores(29.0)["derain"]["levels"]
    # No test split: the figures say so instead of failing.
    unscored = [RunResult("x", "tiny", 1, "l1", 2, 0.0, _history(2, cpr=False),
                          not_evaluated="eval.before_after is false")]
    write_figures(unscored, tmp_path)
    assert len(calls) == 1 and (tmp_path / "selection_histograms.png").is_file()
    text = psnr_figure(unscored).axes[0].texts[0].get_text()
    assert text == "nothing evaluated: eval.before_after is false"


def test_selection_histogram_shares(tmp_path):
    fig_path = tmp_path / "h.png"
    figures.plot_selection_histograms({"a": {"t": _levels(False, (3.0, 1.0, 0.0))},
                                        "b": {"t": _levels(True)}}, fig_path, title="x")
    assert fig_path.is_file()
    assert list(figures._selection_shares(_levels(False)[0])) == [0.75, 0.25, 0.0]
    assert list(figures._selection_shares(_levels(True)[0])) == [0.5, 0.3, 0.2]
    assert math.isclose(sum(figures._selection_shares(_levels(False, (1.0, 1.0, 2.0))[0])), 1.0)

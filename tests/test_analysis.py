"""cpl-analyze: routing records, entropy per task and level, Fig. 4/5/11 figures and their JSON."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cpl_fast.cli.analyze import main as analyze_main
from cpl_fast.data import ArrayPairs, EvalDataset, build_task_ids
from cpl_fast.eval import entropy_bits, restore_image
from cpl_fast.eval.analysis import (
    DEFAULT_BATCH,
    SHIFTED,
    RoutingRecord,
    analyze,
    collect_routing,
    entropy_table,
    residual_picks,
    run_analysis,
    task_information,
)
from cpl_fast.eval.prompt_gap import eval_prompt_gap
from cpl_fast.metrics.image import psnr
from cpl_fast.models import build_model, save_model_state

TASKS = ("denoise_25", "derain", "dehaze")


def _dataset(per_task: int = 3, size: int = 24, sizes: tuple[int, ...] | None = None) -> EvalDataset:
    """``per_task`` images per task, all named ``img0 ...`` (every task degrades images of the same
    names, like the embedded set); ``sizes``: image heights cycled through (default: all ``size``)."""
    rng = np.random.default_rng()
    inputs, targets, tasks, names = [], [], [], []
    for t, task in enumerate(TASKS):
        for i in range(per_task):
            height = sizes[(t * per_task + i) % len(sizes)] if sizes else size
            clean = (rng.random((height, height + 8, 3)) * 255).astype(np.uint8)
            shift = rng.integers(-40, 40, size=clean.shape) * (t + 1) // 3
            inputs.append(np.clip(clean.astype(int) + shift, 0, 255).astype(np.uint8))
            targets.append(clean)
            tasks.append(task)
            names.append(f"img{i}")
    pairs = ArrayPairs(inputs, targets, tasks, names)
    return EvalDataset(pairs, task_ids=build_task_ids(pairs.tasks))


def _model(preset: str, **kwargs):
    model = build_model(preset, **kwargs)
    for p in model.parameters():  # a router that prefers different experts for different images
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("preset, kwargs", [("tiny", {}), ("tiny", {"top_k": 2}), ("tiny_dense", {})])
def test_routing_record_and_entropy_table_agree_with_the_model(preset, kwargs):
    model, data = _model(preset, **kwargs), _dataset()
    record = collect_routing(model, data)
    k = model.top_k or model.num_prompts
    assert record.tasks == [data[i]["task"] for i in range(len(data))]
    assert record.num_levels == 3 and record.indices[0].shape == (len(data), k)
    assert record.dense == (model.top_k is None)
    for i in (0, len(data) - 1):
        own = restore_image(model, data[i]["input"]).routing
        for lv in range(3):
            assert torch.equal(record.indices[lv][i], own[lv].indices[0])
    table = entropy_table(record)
    assert list(table) == list(TASKS)
    for task, levels in table.items():
        rows = record.rows(task)
        for lv, stats in enumerate(levels):
            counts = torch.bincount(record.indices[lv][rows].flatten(), minlength=5).double()
            basis = record.probs[lv][rows].mean(0) if record.dense else counts
            assert stats["selection_entropy"] == pytest.approx(entropy_bits(basis))
            assert 0 <= stats["selection_entropy"] <= math.log2(5) + 1e-9
            per_image = np.mean([entropy_bits(p) for p in record.probs[lv][rows]])
            assert stats["mean_softmax_entropy"] == pytest.approx(per_image)
    gates = record.gate_matrix(0)
    assert torch.allclose(gates.sum(1), record.weights[0].double().sum(1))
    assert ((gates > 0).sum(1) <= k).all()


def test_task_information_separates_task_specific_from_collapsed_routing():
    def record(choice):  # choice[task] -> expert, three images per task, top-1
        tasks = [t for t in ("a", "b") for _ in range(3)]
        idx = torch.tensor([[choice[t]] for t in tasks])
        probs = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1)
        return RoutingRecord(tasks, [str(i) for i in range(6)], [idx], [torch.ones(6, 1)], [probs])

    specific = task_information(record({"a": 0, "b": 3}))[0]
    assert specific["mean_task_selection_entropy"] == 0.0
    assert specific["pooled_selection_entropy"] == pytest.approx(1.0)
    assert specific["task_expert_information"] == pytest.approx(1.0)
    collapsed = task_information(record({"a": 2, "b": 2}))[0]
    assert collapsed["pooled_selection_entropy"] == 0.0 and collapsed["task_expert_information"] == 0.0


def _same_record(a: RoutingRecord, b: RoutingRecord, exact: bool) -> None:
    assert a.tasks == b.tasks and a.names == b.names and a.num_levels == b.num_levels
    for lv in range(a.num_levels):
        # The selections are the same; the softmax values of a batched decode differ from one image's
        # in float32 rounding only (a convolution over a batch may sum in another order).
        assert torch.equal(a.indices[lv], b.indices[lv])
        for x, y in ((a.weights[lv], b.weights[lv]), (a.probs[lv], b.probs[lv])):
            if exact:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset, kwargs", [("tiny", {}), ("tiny", {"top_k": 2}), ("tiny_dense", {})])
def test_batched_collection_equals_one_image_at_a_time(preset, kwargs):
    model = _model(preset, **kwargs)
    data = _dataset(per_task=3, sizes=(24, 32))  # two sizes, interleaved: decoded in separate batches
    single = collect_routing(model, data, batch_size=1)
    # batch_size=1 is the earlier one-image-at-a-time routine exactly: restore_image per image.
    for i in range(len(data)):
        own = restore_image(model, data[i]["input"]).routing
        for lv in range(3):
            assert torch.equal(single.indices[lv][i:i + 1], own[lv].indices)
            assert torch.equal(single.probs[lv][i:i + 1], own[lv].probs.double())
    batched = collect_routing(model, data, batch_size=4)
    _same_record(single, batched, exact=False)
    # Hence the same histograms and, for sparse routing (entropy of the counts), the same selection
    # entropy; what is computed from the softmax agrees to float rounding.
    for task, levels in entropy_table(single).items():
        for a, b in zip(levels, entropy_table(batched)[task]):
            assert a["counts"] == b["counts"]
            if single.dense:
                assert a["selection_entropy"] == pytest.approx(b["selection_entropy"], abs=1e-6)
            else:
                assert a["selection_entropy"] == b["selection_entropy"]
            assert a["mean_softmax_entropy"] == pytest.approx(b["mean_softmax_entropy"], abs=1e-6)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_prompt_gap_of_the_shared_pass_is_eval_prompt_gaps(batch_size):
    model, data = _model("tiny", top_k=2), _dataset(per_task=2, sizes=(24, 32))
    ours = run_analysis(model, data, batch_size=batch_size, residuals=False).prompt_gap
    theirs = eval_prompt_gap(model, data)
    assert list(ours) == list(theirs) == [*sorted(TASKS), "all"]
    for key in theirs:
        for field in ("psnr_positive", "psnr_negative", "gap_db"):
            if batch_size == 1:  # the same decodes, one image at a time: the same numbers
                assert ours[key][field] == theirs[key][field]
            else:
                assert ours[key][field] == pytest.approx(theirs[key][field], abs=1e-4)
    assert run_analysis(_model("tiny_dense"), data).prompt_gap is None


def test_a_batch_that_runs_out_of_memory_is_split():
    class Tight(torch.nn.Module):
        """The tiny model, failing like an exhausted allocator on batches of more than two images."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.num_prompt_levels, self.num_prompts, self.top_k = 3, inner.num_prompts, inner.top_k
            self.batches = []

        def encode(self, x):
            self.batches.append(x.shape[0])
            if x.shape[0] > 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.inner.encode(x)

        def decode(self, state, routing=None, return_routing=False):
            return self.inner.decode(state, routing, return_routing)

    inner, data = _model("tiny"), _dataset(per_task=2)
    tight = Tight(inner)
    split = run_analysis(tight, data, batch_size=6)
    assert tight.batches == [6, 3, 1, 2, 3, 1, 2]  # halves, then halves of halves
    _same_record(split.record, collect_routing(inner, data, batch_size=2), exact=False)
    plain = run_analysis(inner, data, batch_size=2)
    for key, gap in plain.prompt_gap.items():
        assert split.prompt_gap[key] == pytest.approx(gap, abs=1e-4)

    class Broken(Tight):
        def encode(self, x):
            raise RuntimeError("boom")  # not a memory error: raised, not retried

    with pytest.raises(RuntimeError, match="boom"):
        run_analysis(Broken(inner), data)


def test_batches_hold_at_most_the_pixel_budget_of_the_device(monkeypatch):
    from cpl_fast.eval import analysis

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.num_prompt_levels, self.num_prompts, self.top_k = 3, inner.num_prompts, inner.top_k
            self.batches = []

        def encode(self, x):
            self.batches.append(tuple(x.shape))
            return self.inner.encode(x)

        def decode(self, state, routing=None, return_routing=False):
            return self.inner.decode(state, routing, return_routing)

    model, data = Counting(_model("tiny")), _dataset(per_task=2)  # six 24 x 32 images
    monkeypatch.setitem(analysis.BATCH_PIXELS, "cpu", 2 * 24 * 32 + 5)
    run_analysis(model, data, batch_size=8, prompt_gap=False, residuals=False)
    assert model.batches == [(2, 3, 24, 32)] * 3
    monkeypatch.setitem(analysis.BATCH_PIXELS, "cpu", 1)  # smaller than one image: still one at a time
    model.batches.clear()
    run_analysis(model, data, batch_size=8, prompt_gap=False, residuals=False)
    assert model.batches == [(1, 3, 24, 32)] * 6


def test_residual_picks_differ_by_task():
    # The embedded set's order: every clean image under every task, names shared across tasks.
    names = [f"{source}_{k}" for source in ("a", "b", "c", "d") for k in range(4) for _ in range(5)]
    tasks = [f"t{t}" for _ in range(16) for t in range(5)]
    picks = residual_picks(tasks, names)
    assert list(picks) == [f"t{t}" for t in range(5)]
    assert all(tasks[i] == task for task, i in picks.items())
    assert len({names[i] for i in picks.values()}) == 5          # five different scenes
    assert len({names[i][0] for i in picks.values()}) >= 3       # spread over the sources
    # Fewer names than tasks: the last task keeps its starting image rather than failing.
    few = residual_picks(["x", "x", "y", "y", "z", "z"], ["p", "q", "p", "q", "p", "q"])
    assert list(few) == ["x", "y", "z"]
    assert len({few["x"], few["y"], few["z"]}) == 3 and {few["x"], few["y"]} == {0, 3}


def test_residual_maps_one_image_per_task_matched_is_the_plain_restoration():
    model, data = _model("tiny"), _dataset(per_task=3)
    maps = run_analysis(model, data, batch_size=4).residuals
    assert [m["task"] for m in maps] == list(TASKS)
    assert len({m["name"] for m in maps}) == len(TASKS)  # not the same image for every task
    for entry in maps:
        assert [v["routing_of"] for v in entry["variants"]] == [*TASKS, SHIFTED]
        matched = [v for v in entry["variants"] if v["matched"]]
        assert len(matched) == 1 and matched[0]["routing_of"] == entry["task"]
        index = TASKS.index(entry["task"]) * 3 + int(entry["name"][3:])
        item = data[index]
        assert item["task"] == entry["task"] and torch.equal(entry["input"], item["input"])
        assert entry["input_psnr"] == pytest.approx(psnr(item["input"][None], item["target"][None]))
        plain = restore_image(model, item["input"]).image.clamp(0, 1)
        residual = (plain - item["target"][None]).abs().mean(1)[0]
        torch.testing.assert_close(matched[0]["residual"], residual)
        assert matched[0]["psnr"] == pytest.approx(psnr(plain, item["target"][None]), abs=1e-4)
        for v in entry["variants"]:
            assert v["residual"].shape == residual.shape and v["mean_abs_residual"] >= 0
        # Swapping the experts changes the prompt, hence the restoration.
        assert not torch.equal(entry["variants"][-1]["residual"], matched[0]["residual"])
    # The routing of another task's pick, decoded here, is that pick's own routing forced on this image.
    record = run_analysis(model, data, residuals=False).record
    first, second = maps[0], maps[1]
    source = TASKS.index(second["task"]) * 3 + int(second["name"][3:])
    index = TASKS.index(first["task"]) * 3 + int(first["name"][3:])
    forced = [type(r)(record.indices[lv][source:source + 1], record.weights[lv][source:source + 1])
              for lv, r in enumerate(restore_image(model, data[index]["input"]).routing)]
    image = restore_image(model, data[index]["input"], routing=forced).image.clamp(0, 1)
    variant = next(v for v in first["variants"] if v["routing_of"] == second["task"])
    torch.testing.assert_close(variant["residual"], (image - data[index]["target"][None]).abs().mean(1)[0])


def _is_png(path) -> bool:
    with Image.open(path) as img:
        return img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


def test_analyze_writes_figures_and_json(tmp_path):
    model, data = _model("tiny", top_k=2), _dataset()
    result = analyze(model, data, tmp_path / "a", title="probe")
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    figures = ["entropy.png", "selection_histograms.png", "selection_map.png", "residuals.png"]
    assert saved["figures"] == figures
    for name in saved["figures"]:
        assert _is_png(tmp_path / "a" / name)
    assert saved["images"] == len(data) and saved["top_k"] == 2 and not saved["dense"]
    assert saved["uniform_bits"] == pytest.approx(math.log2(5))
    assert len(saved["selection"]) == len(data) and len(saved["selection"][0]["indices"]) == 3
    assert saved["entropy"]["derain"][1]["selection_entropy"] == pytest.approx(
        result["entropy"]["derain"][1]["selection_entropy"])
    assert {v["routing_of"] for v in saved["residuals"][0]["variants"]} == {*TASKS, SHIFTED}
    assert len({r["name"] for r in saved["residuals"]}) == len(TASKS)
    assert all(r["input_psnr"] > 0 for r in saved["residuals"])
    assert saved["prompt_gap"]["all"]["gap_db"] == pytest.approx(result["prompt_gap"]["all"]["gap_db"])
    assert len(saved["task_information"]) == 3
    assert all(0 <= lv["task_expert_information"] <= math.log2(3) + 1e-9 for lv in saved["task_information"])
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        analyze(model, data, tmp_path / "f")


def test_cpl_analyze_command(tmp_path, capsys):
    ckpt = save_model_state(_model("tiny"), tmp_path / "m.safetensors")
    out = tmp_path / "analysis"
    status = analyze_main(["--preset", "demo", "--ckpt", str(ckpt), "--model", "tiny", "--name", "cpl",
                           "-o", str(out), "--max-images", "10", "--no-residuals", "--no-progress"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "selection entropy" in text and "mutual information" in text
    assert (out / "cpl" / "selection_map.png").is_file()
    assert not (out / "cpl" / "residuals.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["cpl"]["entropy"]) == {"denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"}
    assert analyze_main(["--ckpt", str(ckpt), "-o", str(out)]) == 2
    assert "which data?" in capsys.readouterr().err
    assert analyze_main(["--preset", "demo", "--ckpt", str(ckpt), "--model", "tiny", "-o", str(out),
                         "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


def test_cpl_analyze_help_states_the_batch_default(capsys):
    # The parser writes the number rather than importing it (that would load torch for --help).
    with pytest.raises(SystemExit):
        analyze_main(["--help"])
    assert f"(default {DEFAULT_BATCH};" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("setting,calls", [("threads=2", [2]), ("threads=null", [])])
def test_cpl_analyze_applies_the_configs_threads(tmp_path, capsys, monkeypatch, setting, calls):
    # As cpl-train does: torch.set_num_threads(threads) unless threads is None (torch's default).
    recorded = []
    monkeypatch.setattr(torch, "set_num_threads", recorded.append)
    ckpt = save_model_state(_model("tiny"), tmp_path / "m.safetensors")
    status = analyze_main(["--preset", "demo", "--ckpt", str(ckpt), "--set", setting, "--max-images", "2",
                           "-o", str(tmp_path / "analysis"), "--no-residuals", "--no-progress"])
    assert status == 0, capsys.readouterr().err
    assert recorded == calls

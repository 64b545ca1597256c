"""cpl-analyze: routing records, entropy per task and level, Fig. 4/5/11 figures and their JSON."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cpl_fast.data import ArrayPairs, EvalDataset, build_task_ids
from cpl_fast.eval import entropy_bits, restore_image
from cpl_fast.eval.analysis import (
    SHIFTED,
    RoutingRecord,
    analyze,
    collect_routing,
    entropy_table,
    residual_maps,
    task_information,
)
from cpl_fast.eval.cli import analyze_main
from cpl_fast.models import build_model, save_model_state

TASKS = ("denoise_25", "derain", "dehaze")


def _dataset(per_task: int = 3, size: int = 24) -> EvalDataset:
    rng = np.random.default_rng()
    inputs, targets, tasks, names = [], [], [], []
    for t, task in enumerate(TASKS):
        for i in range(per_task):
            clean = (rng.random((size, size + 8, 3)) * 255).astype(np.uint8)
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


def test_residual_maps_matched_is_the_plain_restoration():
    model, data = _model("tiny"), _dataset(per_task=2)
    record = collect_routing(model, data)
    maps = residual_maps(model, data, record)
    assert [m["task"] for m in maps] == list(TASKS)
    for entry in maps:
        assert [v["routing_of"] for v in entry["variants"]] == [*TASKS, SHIFTED]
        matched = [v for v in entry["variants"] if v["matched"]]
        assert len(matched) == 1 and matched[0]["routing_of"] == entry["task"]
        index = TASKS.index(entry["task"]) * 2
        plain = restore_image(model, data[index]["input"]).image.clamp(0, 1)
        residual = (plain - data[index]["target"][None]).abs().mean(1)[0]
        torch.testing.assert_close(matched[0]["residual"], residual)
        for v in entry["variants"]:
            assert v["residual"].shape == residual.shape and v["mean_abs_residual"] >= 0
        # Swapping the experts changes the prompt, hence the restoration.
        assert not torch.equal(entry["variants"][-1]["residual"], matched[0]["residual"])


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

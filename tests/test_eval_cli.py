"""cpl-eval: run folders and weight files, protocols on every row, JSON / markdown output, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from cpl_fast.cli.eval import eval_main
from cpl_fast.config import dump_yaml, load_config
from cpl_fast.data import EvalDataset, build_task_ids, embedded_pairs
from cpl_fast.eval import evaluate, get_protocol
from cpl_fast.models import build_model, save_model_state
from cpl_fast.runs.checkpoints import save_checkpoint


def _run_folder(path, preset: str, k=None, perturb: bool = True):
    """A cpl-train run folder (config.yaml + one checkpoint) of a tiny model on the embedded data."""
    config = load_config("demo", overrides=[f"model.preset={preset}", "name=probe"])
    if k is not None:
        config["model"]["top_k"] = k
    config["baselines"] = {}
    model = build_model(preset, **({"top_k": k} if k is not None else {}))
    if perturb:
        for p in model.parameters():
            p.data.add_(0.02 * torch.randn_like(p))
    path.mkdir(parents=True)
    dump_yaml(config, path / "config.yaml")
    save_checkpoint(path, 7, model, {}, {"step": 7, "epoch": 0, "batches_in_epoch": 7})
    return model.eval()


def _dataset():
    pairs = embedded_pairs("test")
    return EvalDataset(pairs, task_ids=build_task_ids(pairs.tasks))


def test_cpl_eval_on_run_folders_matches_evaluate_and_names_the_protocol(tmp_path, capsys):
    sparse = _run_folder(tmp_path / "sparse", "tiny", k=2)
    dense = _run_folder(tmp_path / "dense", "tiny_dense")
    out_json, out_md = tmp_path / "scores.json", tmp_path / "scores.md"
    status = eval_main(["--ckpt", str(tmp_path / "sparse"), "--ckpt", str(tmp_path / "dense"),
                        "--max-images", "5", "--json", str(out_json), "--markdown", str(out_md),
                        "--entropy", "--no-progress"])
    text = capsys.readouterr().out
    assert status == 0, text
    label = get_protocol("promptir").label
    starts = ("denoise", "derain", "dehaze", "average")
    table_rows = [line for line in text.splitlines() if line.startswith(starts)]
    assert len(table_rows) == 12 and all(line.rstrip().endswith(label) for line in table_rows)
    assert "top-2" in text and "dense" in text and "selection entropy" in text
    payload = json.loads(out_json.read_text())
    assert payload["protocol"] == "promptir" and set(payload["runs"]) == {"sparse", "dense"}
    for name, model in (("sparse", sparse), ("dense", dense)):
        expected = evaluate(model, _dataset(), max_images=5, protocol="promptir")
        got = payload["runs"][name]["scores"]
        assert set(got) == set(expected) == {"denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"}
        for task in expected:
            assert got[task]["psnr"] == pytest.approx(expected[task]["psnr"], rel=1e-6)
            assert got[task]["ssim"] == pytest.approx(expected[task]["ssim"], rel=1e-6)
            assert got[task]["protocol"] == "promptir"
    assert payload["runs"]["sparse"]["model"]["top_k"] == 2
    markdown = out_md.read_text()
    assert "| sparse |" in markdown and "| dense |" in markdown and label in markdown


def test_cpl_eval_weights_file_with_preset_and_other_protocols(tmp_path, capsys):
    model = build_model("tiny").eval()
    ckpt = save_model_state(model, tmp_path / "w.safetensors")
    out_json = tmp_path / "s.json"
    status = eval_main(["--preset", "demo", "--ckpt", str(ckpt), "--model", "tiny", "--protocol", "basicsr_y",
                        "--crop-border", "2", "--max-images", "5", "--tile", "64", "--tile-overlap", "32",
                        "--input-baseline", "--json", str(out_json), "--no-progress"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "basicsr_y (Y, border 2, uint8)" in text and "crop_border 2" in text
    assert "| input (no restoration) |" in text  # the comparison table
    inputs = json.loads(out_json.read_text())["runs"]["input (no restoration)"]["scores"]
    protocol, data = get_protocol("basicsr_y", 2), _dataset()
    item = data[0]  # the first five test images are one crop under the five degradations
    assert inputs[item["task"]]["psnr"] == pytest.approx(protocol.score(item["input"], item["target"])[0])


@pytest.mark.parametrize("extra, message", [
    (["--preset", "three_task", "--data", "{tmp}/nowhere"], "does not exist"),
    ([], "which data?"),
    (["--preset", "demo", "--tile", "20"], "not a multiple of the model's size multiple 8"),
    (["--preset", "demo", "--tile", "64", "--tile-overlap", "64"], "must be smaller than the tile"),
    (["--preset", "demo", "--name", "a", "--name", "b"], "one --name per --ckpt"),
    (["--preset", "demo", "--set", "model.top_k=9"], "must not exceed model.num_prompts"),
    (["--preset", "demo", "--max-images", "0"], "--max-images must be >= 1"),
])
def test_cpl_eval_errors_name_the_problem(tmp_path, capsys, extra, message):
    ckpt = save_model_state(build_model("tiny"), tmp_path / "w.safetensors")
    argv = ["--ckpt", str(ckpt), "--model", "tiny", "--max-images", "1", "--no-progress"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert eval_main(argv) == 2
    assert message in capsys.readouterr().err


def test_cpl_eval_rejects_unknown_protocols_and_corrupt_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_main(["--ckpt", "x", "--protocol", "psnr_y"])
    assert "invalid choice: 'psnr_y'" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x02 not a checkpoint")
    assert eval_main(["--preset", "demo", "--ckpt", str(bad)]) == 2
    assert f"cannot read {bad} as a checkpoint" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pth"
    torch.save({"optimizer": {"lr": 1.0}}, wrong)
    assert eval_main(["--preset", "demo", "--ckpt", str(wrong)]) == 2
    assert "not a recognised checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("setting,calls", [("threads=2", [2]), ("threads=null", [])])
def test_cpl_eval_applies_the_configs_threads(tmp_path, capsys, monkeypatch, setting, calls):
    # As cpl-train does: torch.set_num_threads(threads) unless threads is None (torch's default).
    recorded = []
    monkeypatch.setattr(torch, "set_num_threads", recorded.append)
    ckpt = save_model_state(build_model("tiny"), tmp_path / "w.safetensors")
    status = eval_main(["--preset", "demo", "--ckpt", str(ckpt), "--set", setting, "--max-images", "1",
                        "--no-progress"])
    assert status == 0, capsys.readouterr().err
    assert recorded == calls

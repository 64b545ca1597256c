"""Architecture from the weights: every preset read back from its state dict, short mismatch errors, and a
benchmark preset never replacing what a checkpoint says about its model."""
from __future__ import annotations

import pytest
import torch

from cpl_fast.cli.eval import eval_main
from cpl_fast.models import PRESETS, build_model, load_checkpoint, save_model_state
from cpl_fast.models.infer import ArchitectureError, infer_architecture, model_section, resolved_preset
from cpl_fast.models.registry import _TINY, model_from_config
from cpl_fast.runs.loading import load_model


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (selection biases included), so a load that keeps the init is caught."""
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(torch.randn_like(value))
    return model.eval()


def _lightning(state: dict[str, torch.Tensor]) -> dict:
    return {"state_dict": {f"net.{k}": v.unsqueeze(0) if k.endswith("prompt_param") else v
                           for k, v in state.items()}}


def _assert_same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


TINY_PRESETS = [name for name in PRESETS if name not in ("promptir", "cpl")]


@pytest.mark.parametrize("name", TINY_PRESETS)
@pytest.mark.parametrize("layout", ["plain", "lightning", "basicsr"])
def test_every_tiny_preset_is_read_back_from_its_state_dict(tmp_path, name, layout):
    source = _randomised(build_model(name))
    state = source.state_dict()
    obj = {"plain": state, "lightning": _lightning(state), "basicsr": {"params": state}}[layout]
    torch.save(obj, tmp_path / "w.pth")
    raw = torch.load(tmp_path / "w.pth", weights_only=True)
    arch = infer_architecture(raw["state_dict"] if layout == "lightning" else raw.get("params", raw))
    model_type, kwargs = resolved_preset(name)
    assert arch.model_type == model_type
    assert arch.kwargs == {key: kwargs[key] for key in arch.kwargs}
    section = model_section(arch, kwargs["top_k"])
    assert section == {"preset": name, "top_k": None, "num_prompts": None, "overrides": {}}
    rebuilt = model_from_config(section)
    load_checkpoint(rebuilt, tmp_path / "w.pth", strict=True)
    _assert_same(rebuilt, state)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), source(x))


@pytest.mark.parametrize("name", ["promptir", "cpl"])
def test_full_size_presets_are_read_from_shapes(name):
    # The meta device gives the shapes without 35 M random numbers; the tiny test above loads values.
    with torch.device("meta"):
        model = build_model(name)
    arch = infer_architecture(_lightning(model.state_dict())["state_dict"])   # the published layout
    assert arch.kwargs["dim"] == 48 and arch.kwargs["num_blocks"] == (4, 6, 6, 8)
    assert arch.kwargs["heads"] == (1, 2, 4, 8) and arch.kwargs["ffn_expansion_factor"] == 2.66
    assert arch.kwargs["prompt_dims"] == (64, 128, 320) and arch.kwargs["prompt_sizes"] == (64, 32, 16)
    assert model_section(arch, PRESETS[name]["top_k"])["preset"] == name


def test_an_architecture_no_preset_builds_is_read_and_rebuilt(tmp_path):
    kwargs = {**_TINY, "dim": 16, "num_blocks": (2, 1, 1, 3), "num_refinement_blocks": 0,
              "heads": (2, 1, 4, 2),
              "num_prompts": 3, "prompt_dims": (4, 12, 20), "prompt_sizes": (8, 6, 4), "prompt_heads": 4,
              "ffn_expansion_factor": 1.5, "route_bias": True}
    source = _randomised(build_model({"type": "SparsePromptIR", **kwargs, "top_k": 2}))
    arch = infer_architecture(source.state_dict())
    assert arch.kwargs == {"inp_channels": 3, "out_channels": 3, **kwargs}
    assert arch.sparse is True     # selection biases exist for sparse routers only
    section = model_section(arch, 2)
    assert section["top_k"] == 2 and section["num_prompts"] == 3
    assert section["overrides"]["dim"] == 16 and section["overrides"]["route_bias"] is True
    rebuilt = model_from_config(section)
    assert rebuilt.top_k == 2
    load_checkpoint(rebuilt, source.state_dict(), strict=True)
    _assert_same(rebuilt, source.state_dict())


def test_weights_that_are_no_known_model_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ArchitectureError, match="neither a SparsePromptIR"):
        infer_architecture({"conv.weight": torch.zeros(3, 3, 3, 3)})
    state = build_model("tiny").state_dict()
    broken = {k: v for k, v in state.items() if not k.startswith("decoder_level2.")}
    with pytest.raises(ArchitectureError, match="decoder_level2 has 0 blocks, encoder_level2 1"):
        infer_architecture(broken)
    odd = dict(state)
    odd["prompt2.prompt_param"] = torch.zeros(7, 16, 8, 8)
    with pytest.raises(ArchitectureError, match=r"different numbers of prompts \(5, 7, 5\)"):
        infer_architecture(odd)
    extra = {**state, "something.else": torch.zeros(2)}
    with pytest.raises(ArchitectureError, match="unexpected something.else"):
        infer_architecture(extra)
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: cannot tell the model from the weights.*--model"):
        load_model(tmp_path / "other.pth")


def test_load_model_reads_the_architecture_and_says_which_routing_it_assumed(tmp_path):
    dense = _randomised(build_model("tiny_dense"))
    torch.save(_lightning(dense.state_dict()), tmp_path / "p.ckpt")
    loaded = load_model(tmp_path / "p.ckpt")
    assert loaded.model.top_k is None and loaded.model_config["preset"] == "tiny_dense"
    assert "dense routing assumed (a Lightning checkpoint" in loaded.notes[0]
    _assert_same(loaded.model, dense.state_dict())

    torch.save({"params": dense.state_dict()}, tmp_path / "c.pth")
    loaded = load_model(tmp_path / "c.pth")
    assert loaded.model.top_k == 1 and "top-1 routing assumed (a basicsr checkpoint" in loaded.notes[0]

    biased = _randomised(build_model("tiny", num_prompts=4, dim=16, route_bias=True))
    save_model_state(biased, tmp_path / "b.safetensors")
    loaded = load_model(tmp_path / "b.safetensors")
    assert loaded.model.top_k == 1 and loaded.model_config["num_prompts"] == 4
    assert "preset 'tiny' with dim 16, prompts 4, selection biases yes" in loaded.notes[0]
    assert "selection biases, so sparse" in loaded.notes[0]
    _assert_same(loaded.model, biased.state_dict())


def test_a_lightning_modules_own_state_dict_saved_bare_is_read(tmp_path):
    source = _randomised(build_model("tiny"))
    torch.save({f"net.{k}": v for k, v in source.state_dict().items()}, tmp_path / "module.pt")
    loaded = load_model(tmp_path / "module.pt")
    assert loaded.model_config["preset"] == "tiny" and loaded.report.layout == "plain"
    _assert_same(loaded.model, source.state_dict())


def test_a_model_that_does_not_fit_is_refused_in_two_lines_naming_the_difference(tmp_path):
    bigger = build_model("tiny", dim=16)
    torch.save(bigger.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "w.pth", {"preset": "tiny"})
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert "the weights have dim 16; preset 'tiny' has dim 8" in lines[0]
    assert lines[1] == ("hint: no preset builds these weights; omit --model to use the checkpoint's "
                        "architecture")

    three = build_model("tiny", num_prompts=3)
    torch.save(three.state_dict(), tmp_path / "n3.pth")
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "n3.pth", {"preset": "tiny_dense"})
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and "the weights have prompts 3; preset 'tiny_dense' has prompts 5" in lines[0]
    assert lines[1].startswith("hint: --model tiny_dense --set model.num_prompts=3 fits these weights")


def test_the_mismatch_error_stays_short_for_a_full_size_checkpoint(tmp_path):
    # A full-size PromptIR against the tiny preset differs in ~140 tensors; the error names the
    # architecture, not the tensors.
    torch.save(build_model("promptir").state_dict(), tmp_path / "big.pth")
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "big.pth", {"preset": "tiny"})
    text = str(info.value)
    assert len(text.splitlines()) == 2 and len(text) < 600, text
    assert "the weights have dim 48, blocks per level [4, 6, 6, 8]" in text
    assert "preset 'tiny' has dim 8, blocks per level [1, 1, 1, 1]" in text
    assert "hint: --model cpl fits these weights" in text


def test_cpl_eval_mismatch_is_one_error_line_and_a_hint(tmp_path, capsys):
    torch.save(build_model("tiny", dim=16).state_dict(), tmp_path / "w.pth")
    assert eval_main(["--preset", "demo", "--ckpt", str(tmp_path / "w.pth"), "--model", "tiny",
                      "--max-images", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("cpl-eval: error: ") and err[1].startswith("hint: ")


def test_a_benchmark_preset_does_not_replace_the_checkpoints_model(tmp_path, capsys):
    # demo's model is 'tiny' (top-1, 5 prompts). A dense Lightning checkpoint and a 3-prompt state
    # dict keep their own architecture; the note says so in one line.
    torch.save(_lightning(build_model("tiny_dense").state_dict()), tmp_path / "dense.ckpt")
    torch.save(build_model("tiny", num_prompts=3).state_dict(), tmp_path / "three.pth")
    torch.save({"params": build_model("tiny").state_dict()}, tmp_path / "same.pth")
    args = ["--preset", "demo", "--max-images", "1", "--no-progress"]
    for name, what in (("dense.ckpt", "the checkpoint's routing is dense, --preset demo's model's top-1"),
                       ("three.pth", "the weights have prompts 3; --preset demo's model has prompts 5")):
        assert eval_main([*args, "--ckpt", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        notes = [line for line in out.splitlines() if "the checkpoint's model is used" in line]
        assert notes == [f"note: {what}: the checkpoint's model is used (--model to choose another)"], out
    assert "tiny_dense (dense, 5 prompts)" in eval_main_output(args, tmp_path / "dense.ckpt", capsys)
    assert "tiny (top-1, 3 prompts)" in eval_main_output(args, tmp_path / "three.pth", capsys)
    out = eval_main_output(args, tmp_path / "same.pth", capsys)
    assert "the checkpoint's model is used" not in out and "tiny (top-1, 5 prompts)" in out
    # --set model.* applies to the checkpoint's model (here 3 prompts: top-2 of 3 is valid).
    out = eval_main_output([*args, "--set", "model.top_k=2"], tmp_path / "three.pth", capsys)
    assert "tiny (top-2, 3 prompts)" in out


def eval_main_output(args: list[str], ckpt, capsys) -> str:
    status = eval_main([*args, "--ckpt", str(ckpt)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out

"""Tests of cpl_fast.models.checkpoint: every published layout, our own files, and clear refusals."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from cpl_fast.models import build_model, load_checkpoint, save_model_state
from cpl_fast.models.checkpoint import UNUSED_OFFICIAL_KEYS

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "promptir_state_dict.txt"
# Shapes of the published, never-used 1x1 convolutions at dim=48 (as listed in the reference file).
UNUSED_SHAPES = {"chnl_reduce1.weight": (64, 64, 1, 1), "chnl_reduce2.weight": (128, 128, 1, 1),
                 "chnl_reduce3.weight": (256, 320, 1, 1), "reduce_noise_channel_1.weight": (48, 112, 1, 1),
                 "reduce_noise_channel_2.weight": (96, 224, 1, 1),
                 "reduce_noise_channel_3.weight": (192, 448, 1, 1)}


def randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh random values in the same shapes (so a load that silently keeps the init is caught)."""
    return {key: torch.randn_like(value) for key, value in state.items()}


def official_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict laid out as the published PromptIR: 5-D prompt banks plus the unused convs."""
    out = {key: value.unsqueeze(0) if key.endswith("prompt_param") else value for key, value in state.items()}
    out.update({key: torch.randn(shape) for key, shape in UNUSED_SHAPES.items()})
    return out


def assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert set(ours) == set(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


@pytest.fixture(scope="module")
def cpl_state() -> dict[str, torch.Tensor]:
    return randomised(build_model("cpl").state_dict())


@pytest.fixture(scope="module")
def cpl_model() -> torch.nn.Module:
    return build_model("cpl")


def test_synthesised_official_layout_matches_reference_file(cpl_state):
    if not REFERENCE.is_file():
        pytest.skip(f"reference state-dict listing not found at {REFERENCE}")
    listed = {}
    for line in REFERENCE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            listed[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    official = {key: tuple(value.shape) for key, value in official_state(cpl_state).items()}
    assert official == listed
    assert set(UNUSED_OFFICIAL_KEYS) == set(UNUSED_SHAPES)


def test_lightning_checkpoint(tmp_path, cpl_state, cpl_model):
    path = tmp_path / "promptir.ckpt"
    torch.save({"epoch": 119, "global_step": 1000, "pytorch-lightning_version": "2.0.0",
                "state_dict": {f"net.{key}": value for key, value in official_state(cpl_state).items()},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4}]}]}, path)
    report = load_checkpoint(cpl_model, path)
    assert report.layout == "lightning" and report.source == str(path)
    assert sorted(report.ignored_keys) == sorted(UNUSED_OFFICIAL_KEYS)
    assert sorted(report.reshaped_keys) == [f"prompt{i}.prompt_param" for i in (1, 2, 3)]
    assert report.missing_keys == report.unexpected_keys == []
    assert len(report.loaded_keys) == 542
    assert_loaded(cpl_model, cpl_state)


def test_basicsr_checkpoint_prefers_ema(tmp_path, cpl_state, cpl_model):
    ema = randomised(cpl_state)
    path = tmp_path / "net_g.pth"
    torch.save({"params": official_state(cpl_state), "params_ema": official_state(ema)}, path)
    report = load_checkpoint(cpl_model, path)
    assert report.layout == "basicsr:params_ema"
    assert_loaded(cpl_model, ema)
    torch.save({"params": official_state(cpl_state)}, path)
    assert load_checkpoint(cpl_model, path).layout == "basicsr:params"
    assert_loaded(cpl_model, cpl_state)


def test_ddp_prefixed_state_dict(tmp_path, cpl_state, cpl_model):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{key}": value for key, value in official_state(cpl_state).items()}, path)
    report = load_checkpoint(cpl_model, path)
    assert report.layout == "plain" and len(report.ignored_keys) == 6
    assert_loaded(cpl_model, cpl_state)


def test_in_memory_state_dict_and_compiled_prefix():
    model = build_model("tiny")
    state = randomised(model.state_dict())
    load_checkpoint(model, {f"_orig_mod.{key}": value for key, value in state.items()})
    assert_loaded(model, state)


def test_own_safetensors_roundtrip_is_atomic(tmp_path):
    source = build_model("tiny")
    path = tmp_path / "sub" / "model.safetensors"
    assert save_model_state(source, path) == path
    save_model_state(source, path)                      # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]      # no temp files left
    target = build_model("tiny")
    report = load_checkpoint(target, path)
    assert report.layout == "plain"
    assert_loaded(target, source.state_dict())
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        save_model_state(source, tmp_path / "model.pth")


def test_own_torch_checkpoint(tmp_path):
    source = build_model("tiny")
    path = tmp_path / "last.pt"
    torch.save({"model": source.state_dict(), "step": 7,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    target = build_model("tiny")
    assert load_checkpoint(target, path).layout == "cpl_fast"
    assert_loaded(target, source.state_dict())


def test_shape_mismatch_is_refused_without_loading(tmp_path):
    bigger = build_model("tiny", num_prompts=10)
    path = tmp_path / "ten.pth"
    torch.save(bigger.state_dict(), path)
    model = build_model("tiny")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    message = r"prompt1\.prompt_param: checkpoint \(10, 8, 16, 16\) vs model \(5, 8, 16, 16\)"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(model, path)
    assert_loaded(model, before)


def test_missing_and_unexpected_keys(tmp_path):
    model = build_model("tiny")
    state = randomised(model.state_dict())
    dropped = state.pop("output.weight")
    state["extra.weight"] = torch.randn(2)
    with pytest.raises(ValueError, match=r"missing: output\.weight\n  unexpected: extra\.weight"):
        load_checkpoint(model, state)
    report = load_checkpoint(model, state, strict=False)
    assert report.missing_keys == ["output.weight"] and report.unexpected_keys == ["extra.weight"]
    assert not torch.equal(model.state_dict()["output.weight"], dropped)
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], state["patch_embed.proj.weight"])


@pytest.mark.parametrize("name", ["random.pth", "random.safetensors", "random.ckpt"])
def test_random_bytes_are_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(build_model("tiny"), path)


@pytest.mark.parametrize("name", ["cut.pth", "cut.safetensors"])
def test_truncated_files_are_refused(tmp_path, name):
    model = build_model("tiny")
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_model_state(model, path)
    else:
        torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(model, path)


class _Arbitrary:
    """An object torch.load(weights_only=True) must refuse to build."""


def test_arbitrary_pickles_and_odd_contents_are_refused(tmp_path):
    model = build_model("tiny")
    path = tmp_path / "code.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Arbitrary()}}, f, protocol=2)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(model, path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(ValueError, match="holds a list"):
        load_checkpoint(model, path)
    torch.save({"epoch": 3, "weights": [1, 2]}, path)
    with pytest.raises(ValueError, match="not a recognised checkpoint.*epoch, weights"):
        load_checkpoint(model, path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="path or a state dict"):
        load_checkpoint(model, 3)

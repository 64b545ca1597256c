"""Training configuration: presets, merging, overrides, validation; schedule, EMA and metrics helpers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpl_fast.config import (
    DEFAULTS,
    PRESET_NAMES,
    RECIPES,
    ConfigError,
    apply_overrides,
    dump_yaml,
    flat_dotted,
    load_config,
    merge,
    model_k_n,
    parse_override,
    read_yaml,
    set_dotted,
)
from cpl_fast.eval import entropy_bits, pad_to_multiple, psnr, ssim
from cpl_fast.train.ema import EMA
from cpl_fast.train.schedule import WarmupCosine, build_scheduler, warmup_iterations

# Presets on the embedded data (no data root); the others are the paper's benchmarks.
EMBEDDED = ("demo", "repro", "cpr_study")


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_loads_and_validates(preset):
    config = load_config(preset, data_root=None if preset in EMBEDDED else "/some/data")
    assert config["name"] == preset
    if preset not in EMBEDDED:
        # The paper's recipe (Section IV-B).
        assert config["optim"]["name"] == "adam" and config["optim"]["lr"] == 2e-4
        assert config["data"]["batch"] == 8 and config["data"]["crop"] == 128 and config["data"]["augment"]
        assert config["cpr"]["alpha"] == 0.01 and config["cpr"]["m"] == 4
        assert config["cpr"]["features"] == "vgg19"
        assert model_k_n(config) == (1, 5)
        assert config["schedule"]["warmup_epochs"] == 15 and config["schedule"]["schedule_epochs"] == 150


@pytest.mark.parametrize("preset", [p for p in PRESET_NAMES if p not in EMBEDDED])
def test_file_layouts_need_a_data_root(preset):
    with pytest.raises(ConfigError, match="needs a data root"):
        load_config(preset)


def test_demo_preset_settings():
    config = load_config("demo")
    assert config["data"]["layout"] == "embedded" and config["cpr"]["features"] == "efficientnet_lite0"
    assert config["model"]["preset"] == "tiny" and config["objective"] == "auto"
    assert flat_dotted(config["baselines"]["dense"]) == {"model.preset": "tiny_dense", "objective": "l1"}


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'thre_task'"):
        load_config("thre_task")


def test_overrides_are_typed_yaml_and_dotted():
    config = load_config("demo", overrides=["optim.lr=1e-3", "data.batch=3", "model.top_k=null",
                                            "data.augment=false", "optim.betas=[0.5, 0.9]",
                                            "model.overrides.dim=16"])
    assert config["optim"]["lr"] == pytest.approx(1e-3) and isinstance(config["optim"]["lr"], float)
    assert config["data"]["batch"] == 3 and config["model"]["top_k"] is None
    assert config["data"]["augment"] is False
    assert config["optim"]["betas"] == [0.5, 0.9]
    # The default recipe balances sparse routers, which builds the model with selection biases.
    assert config["model"]["overrides"] == {"dim": 16, "route_bias": True}
    # Siblings survive a deep override.
    assert config["data"]["crop"] == load_config("demo")["data"]["crop"]


@pytest.mark.parametrize("text", ["optim.lr", "=3", "optim..lr=1", "optim lr=1", "optim.lr=[1, 2"])
def test_bad_override_syntax(text):
    with pytest.raises(ConfigError, match="bad override"):
        parse_override(text)


def test_unknown_keys_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting 'optim.lrr' \(did you mean 'lr'\?\)"):
        load_config("demo", overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown setting 'optimizer.lr': 'optimizer' is not a section"):
        load_config("demo", overrides=["optimizer.lr=1"])
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  crop: 64\n  bach: 4\n")
    with pytest.raises(ConfigError, match="unknown setting 'data.bach'"):
        load_config("demo", files=[path])


def test_yaml_files_merge_in_order(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("optim:\n  lr: 5e-4\n  name: adamw\n")
    second.write_text("optim:\n  lr: 1.0e-5\n")
    config = load_config("demo", files=[first, second], overrides=["optim.weight_decay=0.01"])
    assert config["optim"]["lr"] == pytest.approx(1e-5) and config["optim"]["name"] == "adamw"
    assert config["optim"]["weight_decay"] == pytest.approx(0.01)


def test_merge_does_not_touch_its_inputs():
    base = {"data": {"crop": 64, "batch": 2}}
    merged = merge(base, {"data": {"crop": 32}})
    assert merged == {"data": {"crop": 32, "batch": 2}} and base == {"data": {"crop": 64, "batch": 2}}


@pytest.mark.parametrize("overrides, message", [
    (["model.top_k=6"], "model.top_k=6 must not exceed model.num_prompts=5"),
    (["cpr.m=5"], "need m <= n - 1 = 4"),
    (["model.num_prompts=3"], "need m <= n - 1 = 2"),
    (["amp=bf16", "device=cpu"], "amp=bf16 needs a CUDA GPU"),
    (["amp=bf16", "device=cuda", "precision=float64"], "cannot be combined with precision=float64"),
    (["objective=fastest"], "objective must be one of"),
    (["data.crop=60"], "multiple of 8"),
    (["optim.lr=-1"], "optim.lr must be a number"),
    (["optim.accumulate=0"], "optim.accumulate must be an integer >= 1"),
    (["model.preset=huge"], "model.preset 'huge' is unknown"),
    (["model.overrides.top_k=2"], "set model.top_k instead"),
    (["data.layout=paired"], "needs a data root"),
    (["cpr.features=resnet"], "cpr.features must be one of"),
    (["objective=fast", "cpr.neg_chunk=0"], "cpr.neg_chunk must be an integer >= 1"),
    (["objective=loop", "cpr.neg_chunk=2"], "objective 'loop' does not take it"),
    (["train.cpu_allocator=jemalloc"], "train.cpu_allocator must be one of"),
])
def test_validation_errors_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides=overrides)


def test_m_is_free_with_other_task_and_l1():
    assert load_config("demo", overrides=["cpr.m=6", "cpr.negative_sampler=other_task"])["cpr"]["m"] == 6
    assert load_config("demo", overrides=["cpr.m=6", "objective=l1"])["cpr"]["m"] == 6


def test_k_all_is_dense():
    assert model_k_n(load_config("demo", overrides=["model.top_k=all", "model.num_prompts=7"])) == (None, 7)
    assert model_k_n(load_config("demo", overrides=["model.preset=tiny_dense"])) == (None, 5)


def test_apply_overrides_and_roundtrip(tmp_path):
    config = load_config("demo")
    variant = apply_overrides(config, {"model.preset": "tiny_dense", "objective": "l1"})
    assert variant["model"]["preset"] == "tiny_dense" and config["model"]["preset"] == "tiny"
    with pytest.raises(ConfigError, match="unknown setting"):
        apply_overrides(config, {"model.presett": "x"})
    dump_yaml(variant, tmp_path / "config.yaml")
    assert read_yaml(tmp_path / "config.yaml") == variant


def test_set_dotted_creates_entries_below_free_mappings():
    config = {"baselines": {}}
    set_dotted(config, "baselines.sparse_l1.objective", "l1")
    assert config == {"baselines": {"sparse_l1": {"objective": "l1"}}}


def test_defaults_name_every_section_and_the_paper_form_is_one_setting():
    sections = {"model", "cpr", "router", "health", "optim", "schedule", "data", "train", "checkpoint", "ema",
                "logging"}
    assert sections <= set(DEFAULTS)
    assert DEFAULTS["cpr"]["negative_sampler"] == "mismatched_experts"
    assert DEFAULTS["cpr"]["recipe"] == "stable" and DEFAULTS["cpr"]["form"] == "hinge"
    assert RECIPES["paper"]["cpr.form"] == "difference" and RECIPES["paper"]["router.balance"] == "none"
    # DEFAULTS hold the default recipe's values, so reading them never contradicts the recipe.
    for key, value in RECIPES["stable"].items():
        section, name = key.split(".")
        assert DEFAULTS[section][name] == value, key


# ------------------------------------------------------------------------------------ schedule

def test_warmup_cosine_shape():
    f = WarmupCosine(warmup=4, total=20, floor=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    mid = 4 + 8
    assert f(mid) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="warmup < total"):
        WarmupCosine(5, 5)


def test_warmup_is_the_recipe_fraction_and_scheduler_steps():
    assert warmup_iterations(15, 150, 1000) == 100
    assert warmup_iterations(15, 150, 3) == 0
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([param], lr=2e-4)
    sched = build_scheduler(opt, "warmup_cosine", total=100, warmup_epochs=15, schedule_epochs=150)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2e-4 / 10) and lrs[9] == pytest.approx(2e-4) and lrs[-1] < 1e-6
    state = sched.state_dict()
    assert state["last_epoch"] == 100
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler(opt, "step", total=10)


# ------------------------------------------------------------------------------------------ EMA

def test_ema_update_formula():
    model = torch.nn.Linear(3, 2).double()
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[name], 0.9 * start[name] + 0.1 * value)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


# -------------------------------------------------------------------------------------- metrics

def test_psnr_matches_the_formula_and_ssim_is_one_for_equal_images():
    target = torch.rand(3, 24, 20, dtype=torch.float64)
    restored = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    mse = float(((restored - target) ** 2).mean())
    assert psnr(restored, target) == pytest.approx(10 * math.log10(1.0 / mse))
    assert psnr(target, target) == math.inf
    assert ssim(target, target) == pytest.approx(1.0)
    assert ssim(restored, target) < 1.0
    with pytest.raises(ValueError, match="RGB image"):
        psnr(torch.rand(1, 8, 8), torch.rand(1, 8, 8))


def test_entropy_bits():
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)
    assert entropy_bits(np.array([0.0, 5.0, 0.0])) == 0.0
    p = torch.rand(7, dtype=torch.float64) + 0.01
    q = p / p.sum()
    assert entropy_bits(p) == pytest.approx(float(-(q * q.log2()).sum()))
    for bad in ([], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError):
            entropy_bits(bad)


def test_pad_to_multiple():
    x = torch.rand(1, 3, 13, 16)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape == (1, 3, 16, 16) and size == (13, 16)
    torch.testing.assert_close(padded[..., :13, :], x)


def test_choice_lists_are_read_from_the_registries(monkeypatch):
    from cpl_fast.config import registry_choices
    from cpl_fast.data.layouts import LAYOUTS
    from cpl_fast.losses import CPR_FORMS, FEATURES, NEGATIVE_SAMPLERS, negatives

    choices = registry_choices()
    assert choices["cpr.negative_sampler"] == tuple(NEGATIVE_SAMPLERS)
    assert choices["cpr.features"] == tuple(FEATURES) and choices["cpr.form"] == tuple(CPR_FORMS)
    assert set(LAYOUTS) < set(choices["data.layout"])
    # A sampler registered below the config is a valid setting without a second list to edit.
    monkeypatch.setitem(negatives.NEGATIVE_SAMPLERS, "every_other", negatives.MismatchedExperts)
    assert load_config("demo", overrides=["cpr.negative_sampler=every_other"])["cpr"]["negative_sampler"] == "every_other"
    with pytest.raises(ConfigError, match="cpr.negative_sampler must be one of mismatched_experts, other_task, every_other"):
        load_config("demo", overrides=["cpr.negative_sampler=nope"])


def test_presets_are_the_shipped_yaml_files():
    import importlib.resources

    shipped = {p.name[:-5] for p in importlib.resources.files("cpl_fast.configs").iterdir()
               if p.name.endswith(".yaml")}
    assert set(PRESET_NAMES) == shipped and "demo" in shipped

"""Router balancing (aux loss, selection biases), training-health signals and the new CPR settings."""
from __future__ import annotations

import math

import pytest
import torch

from cpl_fast.config import ConfigError, apply_overrides, load_config
from cpl_fast.metrics.routing import collapse_warnings, prompt_gap_db, routing_health, task_expert_information
from cpl_fast.models import Routing, build_model
from cpl_fast.models.spm import SparsePromptModule
from cpl_fast.train.health import TrainingHealth
from cpl_fast.train.router_balance import load_balancing_loss, update_route_bias
from cpl_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------- health signals

def test_planted_collapse_is_detected_and_healthy_routing_is_not():
    tasks = torch.arange(3).repeat_interleave(4)
    collapsed = torch.full((12, 1), 2)
    stats = routing_health(collapsed, tasks, n=5)
    assert stats["usage_entropy"] == 0.0 and stats["task_information"] == 0.0 and stats["top_share"] == 1.0
    warnings = collapse_warnings([stats])
    assert len(warnings) == 1 and "level 0" in warnings[0] and "router.balance" in warnings[0]
    # One expert per task: the routing names the task exactly, log2(3) bits.
    specialised = tasks.unsqueeze(1).clone()
    healthy = routing_health(specialised, tasks, n=5)
    assert healthy["task_information"] == pytest.approx(math.log2(3))
    assert collapse_warnings([healthy]) == []
    # Balanced but task-blind routing (each task spreads over the same four experts): no information.
    blind = torch.arange(12).remainder(4).unsqueeze(1)
    assert task_expert_information(blind, tasks, 5) == pytest.approx(0.0)
    assert routing_health(blind, tasks, 5)["usage_entropy"] == pytest.approx(2.0)


def test_prompt_gap_and_its_warning():
    target = 0.2 + 0.6 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))   # no clipping
    restored = target + 0.01
    negatives = torch.stack([target + 0.1, target - 0.1])
    gap = prompt_gap_db(restored, negatives, target)
    assert gap == pytest.approx(40.0 - 20.0, abs=1e-4)    # PSNR 40 dB vs 20 dB (float32 inputs)
    assert any("prompt gap" in w for w in collapse_warnings([], gap_db=gap))
    assert collapse_warnings([], gap_db=3.0) == []


def test_training_health_warns_once_per_collapsed_level():
    model = build_model("tiny")
    messages: list[str] = []
    health = TrainingHealth(model, load_config("demo"), messages.append)
    tasks = torch.arange(3).repeat_interleave(2)
    for _ in range(3):
        health.observe([torch.zeros(6, 1, dtype=torch.long), tasks.unsqueeze(1) % 5, torch.ones(6, 1).long()],
                       tasks)
    summary = health.summary(step=30)
    assert summary["usage_entropy_l0"] == 0.0 and summary["task_info_l1"] == pytest.approx(math.log2(3))
    assert len(messages) == 2 and "level 0" in messages[0] and "level 2" in messages[1]
    health.observe([torch.zeros(6, 1, dtype=torch.long), tasks.unsqueeze(1), torch.zeros(6, 1).long()], tasks)
    health.summary(step=40)
    assert len(messages) == 2                           # once per level and kind
    assert health.shared and all(p.requires_grad for p in health.shared)
    prompt_params = {id(p) for spm in model.prompt_modules() for p in spm.parameters()}
    assert not any(id(p) in prompt_params for p in health.shared)


# ----------------------------------------------------------------------------------- router balancing

def test_load_balancing_loss_is_one_when_balanced_and_n_when_collapsed():
    n = 4
    probs = torch.full((8, n), 1.0 / n)
    balanced = Routing(torch.arange(8).remainder(n).unsqueeze(1), probs[:, :1], probs)
    assert float(load_balancing_loss([balanced], n)) == pytest.approx(1.0)
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    collapsed = Routing(torch.zeros(8, 1, dtype=torch.long), peaked[:, :1], peaked)
    assert float(load_balancing_loss([collapsed, collapsed], n)) == pytest.approx(2 * n * 0.97)
    logits = torch.randn(8, n, requires_grad=True)
    p = logits.softmax(dim=1)
    crowded = Routing(torch.zeros(8, 1, dtype=torch.long), p[:, :1], p)
    grad, = torch.autograd.grad(load_balancing_loss([crowded], n), logits)
    assert (grad[:, 0] > 0).all()                       # the busy expert's probability is pushed down
    with pytest.raises(ValueError, match="probabilities"):
        load_balancing_loss([Routing(balanced.indices, balanced.weights, None)], n)


def test_selection_bias_changes_the_choice_not_the_gate_weight():
    torch.manual_seed(0)
    spm = SparsePromptModule(4, 5, 3, 6, top_k=1, route_bias=True)
    plain = SparsePromptModule(4, 5, 3, 6, top_k=1)
    assert "route_bias" in spm.state_dict() and "route_bias" not in plain.state_dict()
    probs = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]])
    assert spm.route(probs).indices.item() == 0
    spm.route_bias[1] = 0.4
    chosen = spm.route(probs)
    assert chosen.indices.item() == 1 and chosen.weights.item() == pytest.approx(0.2)


def test_bias_update_moves_toward_a_balanced_load():
    model = build_model("tiny", route_bias=True)
    crowded = [Routing(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1))] * 3
    update_route_bias(model, crowded, rate=0.01)
    for spm in model.prompt_modules():
        assert spm.route_bias[0] == pytest.approx(-0.01) and (spm.route_bias[1:] == 0.01).all()
    with pytest.raises(ValueError, match="route_bias"):
        update_route_bias(build_model("tiny"), crowded, rate=0.01)


# ----------------------------------------------------------------------------------- config

@pytest.mark.parametrize("setting,word", [
    ("cpr.form=softmax", "cpr.form"), ("cpr.distance=l3", "cpr.distance"),
    ("cpr.neg_grad=most", "cpr.neg_grad"),
    ("cpr.anchor_grad=maybe", "cpr.anchor_grad"), ("cpr.margin=0", "cpr.margin"), ("cpr.tau=-1", "cpr.tau"),
    ("cpr.alpha_relative=0", "cpr.alpha_relative"), ("cpr.alpha=.inf", "cpr.alpha"),
    ("cpr.warmup_steps=-1", "cpr.warmup_steps"), ("cpr.recipe=best", "cpr.recipe"),
    ("router.balance=fair", "router.balance"), ("router.bias_rate=-1", "router.bias_rate"),
    ("health.grad_ratio_every=-2", "health.grad_ratio_every"),
])
def test_bad_settings_are_named(setting, word):
    with pytest.raises(ConfigError, match=word.replace(".", r"\.")):
        load_config("demo", overrides=[setting])


def test_balancing_a_dense_router_is_refused_and_bias_builds_the_model_with_biases():
    with pytest.raises(ConfigError, match="dense"):
        load_config("demo", overrides=["model.preset=tiny_dense", "router.balance=bias"])
    config = load_config("demo", overrides=["router.balance=bias"])
    assert config["model"]["overrides"]["route_bias"] is True


def test_recipe_bundle_sits_under_explicit_settings():
    paper = load_config("demo", overrides=["cpr.recipe=paper"])
    cpr = paper["cpr"]
    settings = (cpr["form"], cpr["alpha"], cpr["neg_grad"], cpr["negatives_per_step"])
    assert settings == ("difference", 0.01, "all", None) and paper["router"]["balance"] == "none"
    # The default recipe decodes a subset of the negatives; the paper's decodes all m.
    stable = load_config("demo")["cpr"]
    assert (stable["form"], stable["negatives_per_step"]) == ("hinge", 2)
    with pytest.raises(ConfigError, match=r"negatives_per_step=2 must be <= cpr.m=1: set it to at most m"):
        load_config("demo", overrides=["cpr.m=1"])
    assert load_config("demo", overrides=["cpr.m=1", "cpr.negatives_per_step=null"])["cpr"]["m"] == 1
    explicit = load_config("demo", overrides=["cpr.recipe=paper", "cpr.alpha=0.5"])
    assert explicit["cpr"]["alpha"] == 0.5
    # A baseline asking for the paper recipe gets the paper's settings whatever the main run used.
    main = load_config("demo", overrides=["cpr.form=hinge", "cpr.alpha=0.2"])
    baseline = apply_overrides(main, {"cpr.recipe": "paper"})
    assert baseline["cpr"]["form"] == "difference" and baseline["cpr"]["alpha"] == 0.01


# ----------------------------------------------------------------------------------- trainer

SMALL = ["data.crop=32", "data.batch=2", "logging.progress=false", "eval.before_after=false",
         "report.enabled=false", "baselines={}", "train.log_every=2", "checkpoint.every=100",
         "logging.tensorboard=false", "cpr.m=2", "objective=fast"]


def test_relative_alpha_warmup_and_ramp(tmp_path):
    config = load_config("demo", overrides=[*SMALL, "train.iterations=5", "cpr.alpha_relative=0.25",
                                            "cpr.form=logistic", "cpr.warmup_steps=2", "cpr.ramp_steps=2",
                                            "router.balance=bias", "health.grad_ratio_every=4"])
    messages: list[str] = []
    trainer = Trainer(config, tmp_path, log=messages.append)
    history = trainer.fit()
    assert [h["alpha"] for h in history[:2]] == [0.0, 0.0] and all(h["cpr"] == 0.0 for h in history[:2])
    alpha = trainer.cpr_calibration["alpha"]
    # Calibrated on step 3's own batch and negatives: alpha * L_pos = 0.25 * L1 there.
    assert alpha * history[2]["l_pos"] == pytest.approx(0.25 * history[2]["l1"], rel=1e-5)
    assert trainer.cpr_calibration["tau"] == pytest.approx(history[2]["l_pos"], rel=1e-5)
    assert [h["alpha"] for h in history[2:]] == pytest.approx([alpha / 2, alpha, alpha])
    assert "grad_ratio" in history[3] and history[3]["grad_ratio"] > 0
    assert all("prompt_gap" in h for h in history[2:])
    assert any(spm.route_bias.abs().sum() > 0 for spm in trainer.model.prompt_modules())
    assert any("calibrated" in m for m in messages)
    # Resuming keeps the calibration instead of measuring it again on another batch.
    resumed = Trainer(config, tmp_path, resume=True, log=lambda message: None)
    assert resumed.cpr_calibration == trainer.cpr_calibration


def test_aux_loss_and_gradient_modes_train(tmp_path):
    config = load_config("demo", overrides=[*SMALL, "train.iterations=2", "router.balance=aux_loss",
                                            "cpr.neg_grad=prompts", "cpr.anchor_grad=false",
                                            "cpr.distance=l1"])
    history = Trainer(config, tmp_path, log=lambda message: None).fit()
    assert all(0 < h["router_aux"] < 0.01 * 3 * 5 for h in history)    # aux_weight * levels * [.., n]
    assert all(math.isfinite(h["loss"]) for h in history)


def test_weights_without_selection_biases_load_into_a_balanced_model():
    """Official and unbalanced checkpoints have no route_bias: zeros select as their router did."""
    from cpl_fast.models.checkpoint import load_checkpoint

    source = build_model("tiny")
    target = build_model("tiny", route_bias=True)
    report = load_checkpoint(target, source.state_dict())
    assert len(report.filled_keys) == 3 and not report.missing_keys
    x = torch.rand(1, 3, 16, 16)
    source.eval(), target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)

"""The CPR variants (forms, distances, anchor and negative gradients), in every step, in float64."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cpl_fast.losses import CPRLoss, PerceptualFeatures
from cpl_fast.models import build_model
from cpl_fast.train import MismatchedExperts, fast_cpl_step, literal_cpl_step, loop_cpl_step
from cpl_fast.train.steps.negative_grad import NEG_GRAD_MODES, excluded_parameters, negative_pass

SIZE = 8


def fresh(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def layers(seed: int, batch: int = 3, m: int = 2):
    """Two feature layers: positives, ground truths, negatives (requires_grad where the loss trains)."""
    shapes = [(batch, 4, 3, 3), (batch, 6, 2)]
    pos = [fresh(*s, seed=seed + i).requires_grad_() for i, s in enumerate(shapes)]
    gt = [fresh(*s, seed=seed + 10 + i) for i, s in enumerate(shapes)]
    neg = [fresh(m, *s, seed=seed + 20 + i).requires_grad_() for i, s in enumerate(shapes)]
    return pos, gt, neg


def by_hand(pos, gt, neg, form, distance, weights, margin=1.0, tau=None, eps=1e-7, neg_w=None):
    """The module docstring's formulas, written out per layer and sample."""
    d = (lambda a, b: (a - b).pow(2)) if distance == "l2" else (lambda a, b: (a - b).abs())
    batch, m = pos[0].shape[0], neg[0].shape[0]
    regs = []
    for b in range(batch):
        lp = ln = ratio = 0.0
        for w, p, g, n in zip(weights, pos, gt, neg):
            pl = d(p[b], g[b]).mean()
            nl = sum((1.0 if neg_w is None else neg_w[b, t]) * d(n[t, b], p[b]).mean() for t in range(m)) / m
            lp, ln = lp + w * pl, ln + w * nl
            ratio = ratio + w * pl / (nl + eps)
        regs.append({"difference": lp - ln, "ratio": ratio, "hinge": lp + F.relu(margin * lp - ln),
                     "logistic": (tau or 1.0) * F.softplus((lp - ln) / (tau or 1.0))}[form])
    return torch.stack(regs).mean()


@pytest.mark.parametrize("form,distance", list(itertools.product(["difference", "ratio", "hinge", "logistic"],
                                                                 ["l2", "l1"])))
def test_forms_and_distances_match_the_formulas(form, distance):
    pos, gt, neg = layers(1)
    weights = [0.5, 2.0]
    neg_w = torch.rand(3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    loss = CPRLoss(alpha=0.3, form=form, distance=distance, layer_weights=weights, margin=0.7, tau=0.4)
    got = loss(pos, gt, neg, neg_w).loss
    want = 0.3 * by_hand(pos, gt, neg, form, distance, weights, margin=0.7, tau=0.4, neg_w=neg_w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, [*pos, *neg])
    wants = torch.autograd.grad(want, [*pos, *neg])
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# A detached anchor is a stop-gradient, which finite differences cannot see: checked separately below.
@pytest.mark.parametrize("form,distance,anchor", [("difference", "l2", True), ("hinge", "l1", True),
                                                  ("logistic", "l2", True), ("ratio", "l1", True)])
def test_gradcheck(form, distance, anchor):
    pos, gt, neg = layers(5, batch=2)
    loss = CPRLoss(alpha=0.7, form=form, distance=distance, anchor_grad=anchor, layer_weights=[1.0, 0.5],
                   tau=0.8, margin=1.5)
    # l1 has kinks at 0: the random inputs never sit on one.
    assert torch.autograd.gradcheck(lambda *t: loss(list(t[:2]), gt, list(t[2:])).loss, (*pos, *neg))


def test_detached_anchor_leaves_only_l_pos_on_the_positive():
    pos, gt, neg = layers(7)
    detached = CPRLoss(alpha=1.0, anchor_grad=False, layer_weights=[1.0, 1.0])(pos, gt, neg)
    full = CPRLoss(alpha=1.0, layer_weights=[1.0, 1.0])(pos, gt, neg)
    torch.testing.assert_close(detached.loss, full.loss)
    grad_pos = torch.autograd.grad(detached.loss, pos, retain_graph=True)
    only_pos = torch.autograd.grad(detached.l_pos.mean(), pos)
    for g, w in zip(grad_pos, only_pos):
        torch.testing.assert_close(g, w)
    # The negatives still get the negative term's gradient.
    grad_neg = torch.autograd.grad(detached.loss, neg)
    assert all(g.abs().sum() > 0 for g in grad_neg)


def test_hinge_stops_pushing_past_the_margin():
    pos, gt, neg = layers(2)
    far = [n.detach().mul(50.0).requires_grad_() for n in neg]     # L_neg >> margin * L_pos
    out = CPRLoss(alpha=1.0, form="hinge", margin=1.0, layer_weights=[1.0, 1.0])(pos, gt, far)
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(out.loss, far))


def test_logistic_needs_tau_and_bad_settings_are_named():
    pos, gt, neg = layers(3)
    with pytest.raises(ValueError, match="tau"):
        CPRLoss(form="logistic")(pos, gt, neg)
    for kwargs, word in [({"form": "softmax"}, "form"), ({"distance": "l3"}, "distance"),
                         ({"margin": 0.0}, "margin"), ({"tau": -1.0}, "tau"),
                         ({"alpha": float("inf")}, "alpha"), ({"anchor_grad": "yes"}, "anchor_grad")]:
        with pytest.raises(ValueError, match=word):
            CPRLoss(**kwargs)


# --------------------------------------------------------------------------------------- steps

@pytest.fixture(scope="module")
def features():
    return PerceptualFeatures.random_vgg19(seed=0, layers=("relu1_1", "relu2_1")).double()


def make_model():
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return build_model("tiny").double()


def make_batch(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    return (target + 0.2 * noise).clamp(0, 1), target


def run_step(step, model, features, loss, mode, **extra):
    return step(model, make_batch(), features, loss, MismatchedExperts(5), m=2,
                generator=torch.Generator().manual_seed(3), neg_grad=mode, **extra)


def grads(out, model):
    params = list(model.parameters())
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(out.loss, params, allow_unused=True), params)]


def rel(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


# Every form, distance, anchor setting and gradient mode at least once.
VARIANTS = [
    ("difference", "l1", False, "none"), ("hinge", "l2", True, "prompts"),
    ("logistic", "l1", True, "no_bank"),
    ("ratio", "l2", False, "all"),
]


@pytest.mark.parametrize("form,distance,anchor,mode", VARIANTS)
def test_every_step_computes_the_literal_step(features, form, distance, anchor, mode):
    model = make_model()
    loss = CPRLoss(alpha=0.5, form=form, distance=distance, anchor_grad=anchor, tau=0.3, margin=0.8)
    literal = run_step(literal_cpl_step, model, features, loss, mode)
    want = grads(literal, model)
    chunk = {"neg_chunk": 1} if mode in ("none", "no_bank") else {}
    for step, extra in ((loop_cpl_step, {}), (fast_cpl_step, chunk)):
        out = run_step(step, model, features, loss, mode, **extra)
        for name in ("loss", "l1", "cpr", "l_pos", "l_neg", "restored", "negative_images"):
            assert rel(getattr(out, name), getattr(literal, name)) <= 1e-10, (step.__name__, name)
        for g, w in zip(grads(out, model), want):
            assert rel(g, w) <= 1e-10, step.__name__
    assert all(p.requires_grad for p in model.parameters())    # restored after the negatives' pass


def _split(model, gradients):
    bank = {id(spm.prompt_param) for spm in model.prompt_modules()}
    prompt = {id(p) for spm in model.prompt_modules() for p in spm.parameters()}
    pairs = list(zip(model.parameters(), gradients))
    return ([g for p, g in pairs if id(p) in bank], [g for p, g in pairs if id(p) not in prompt])


def test_gradient_modes_send_the_negatives_gradient_where_they_say(features):
    """With a detached anchor, L_neg's gradient reaches the model only through the negatives."""
    model = make_model()
    loss = CPRLoss(alpha=2.0, anchor_grad=False)
    by_mode = {mode: _split(model, grads(run_step(loop_cpl_step, model, features, loss, mode), model))
               for mode in NEG_GRAD_MODES}
    same = lambda a, b: all(rel(x, y) <= 1e-12 for x, y in zip(a, b))  # noqa: E731
    none_bank, none_shared = by_mode["none"]
    all_bank, all_shared = by_mode["all"]
    assert not same(all_bank, none_bank) and not same(all_shared, none_shared)
    prompts_bank, prompts_shared = by_mode["prompts"]
    assert same(prompts_shared, none_shared) and not same(prompts_bank, none_bank)
    no_bank_bank, no_bank_shared = by_mode["no_bank"]
    assert same(no_bank_bank, none_bank) and not same(no_bank_shared, none_shared)


def test_negative_pass_restores_flags_after_an_error():
    model = make_model()
    model.prompt3.conv3x3.weight.requires_grad_(False)          # a frozen parameter stays frozen
    with pytest.raises(RuntimeError):
        with negative_pass(model, "prompts"):
            assert not model.patch_embed.proj.weight.requires_grad
            raise RuntimeError("boom")
    assert model.patch_embed.proj.weight.requires_grad
    assert not model.prompt3.conv3x3.weight.requires_grad
    assert len(excluded_parameters(model, "no_bank")) == 3
    with pytest.raises(ValueError, match="neg_grad"):
        with negative_pass(model, "some"):
            pass

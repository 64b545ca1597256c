"""``negatives_per_step=r``: r of the m negatives per step, drawn uniformly (fast, loop and literal steps).

The paper's difference form is linear in ``L_neg``, so averaging the r-subsampled step over every one
of the C(m, r) subsets must give the full step's loss and gradients (float64, to rounding). The
convex forms' average is at least the full step's loss (Jensen). Each subsampled step is the CPR step
over its r negatives, the three steps agree on the same draw, and the trainer passes the setting through.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_fast_step import assert_same_step, make_batch, make_model, max_relative_error

from cpl_fast.losses import CPRLoss, PerceptualFeatures
from cpl_fast.train import MismatchedExperts, fast_cpl_step, literal_cpl_step, loop_cpl_step
from cpl_fast.train.steps.inputs import draw_negative_subset
from cpl_fast.train.steps.runner import StepContext, StepModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features():
    return PerceptualFeatures.random_vgg19(seed=0, layers=("relu1_1", "relu2_1")).double()


def seed_per_subset(m: int, r: int) -> dict[tuple[int, ...], int]:
    """One generator seed per r-subset of range(m) (the first seed that draws it)."""
    wanted = math.comb(m, r)
    seeds: dict[tuple[int, ...], int] = {}
    for seed in range(100 * wanted):
        subset = tuple(draw_negative_subset(m, r, torch.Generator().manual_seed(seed)))
        seeds.setdefault(subset, seed)
        if len(seeds) == wanted:
            return seeds
    raise AssertionError(f"draw_negative_subset({m}, {r}) drew only {sorted(seeds)} in {100 * wanted} seeds")


def given_negatives(model, batch, m: int):
    with torch.no_grad():
        _, routing = model(batch[0], return_routing=True)
    return MismatchedExperts(model.num_prompts)(routing, m, generator=torch.Generator().manual_seed(9))


def loss_and_grads(out, params):
    return out.loss.detach(), torch.autograd.grad(out.loss, params)


def test_draw_is_uniform_over_subsets():
    """Every r-subset is drawn, with frequencies close to 1 / C(m, r), sorted and without repeats."""
    m, r, draws = 4, 2, 3000
    g = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(draws):
        subset = draw_negative_subset(m, r, g)
        assert subset == sorted(set(subset)) and len(subset) == r and all(0 <= t < m for t in subset)
        counts[tuple(subset)] = counts.get(tuple(subset), 0) + 1
    assert sorted(counts) == list(itertools.combinations(range(m), r))
    expected = draws / math.comb(m, r)
    # 5 standard deviations of a binomial count
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values()), counts
    assert draw_negative_subset(m, None) is None and draw_negative_subset(m, m) is None


@pytest.mark.parametrize("name,m,r,weighted", [("tiny", 4, 1, False), ("tiny", 4, 2, True),
                                                ("nafnet_tiny", 4, 3, False), ("tiny", 3, 2, True)])
def test_difference_form_expectation_equals_full_step(features, name, m, r, weighted):
    """Mean over all C(m, r) subsets of loss and every parameter's gradient = the full m-negative step."""
    model = make_model(name, 1, torch.float64)
    batch = make_batch(2, torch.float64, None)
    negatives = given_negatives(model, batch, m)
    g = torch.Generator().manual_seed(5)
    neg_weights = torch.rand(2, m, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    loss = CPRLoss(alpha=0.5, form="difference")
    params = [p for p in model.parameters() if p.requires_grad]
    run = dict(m=m, negatives=negatives, neg_weights=neg_weights)
    sampler = MismatchedExperts(model.num_prompts)

    full = fast_cpl_step(model, batch, features, loss, sampler, **run)
    full_loss, full_grads = loss_and_grads(full, params)
    subsets = seed_per_subset(m, r)
    mean_loss = torch.zeros((), dtype=torch.float64)
    mean_grads = [torch.zeros_like(p) for p in params]
    for subset, seed in subsets.items():
        out = fast_cpl_step(model, batch, features, loss, sampler, negatives_per_step=r,
                            generator=torch.Generator().manual_seed(seed), **run)
        assert [id(n) for n in out.negatives] == [id(negatives[t]) for t in subset]
        assert out.negative_images.shape[0] == r and out.l_neg.shape == (2,)
        step_loss, grads = loss_and_grads(out, params)
        mean_loss += step_loss / len(subsets)
        for total, grad in zip(mean_grads, grads):
            total += grad / len(subsets)
        # A single draw is not the full step (otherwise this test could not tell the two apart).
        assert max_relative_error(step_loss, full_loss) > 1e-8
    assert max_relative_error(mean_loss, full_loss) <= 1e-10
    for mean, full_grad in zip(mean_grads, full_grads):
        assert max_relative_error(mean, full_grad) <= 1e-10


@pytest.mark.parametrize("form", ["ratio", "hinge", "logistic"])
def test_convex_forms_expectation_is_at_least_the_full_loss(features, form):
    """Jensen: the forms are convex in L_neg, so the mean over subsets of the loss is >= the full loss."""
    m, r = 4, 1
    model = make_model("tiny", 1, torch.float64)
    degraded = make_batch(2, torch.float64, None)[0]
    negatives = given_negatives(model, (degraded, degraded), m)
    # A target near the positive restoration puts L_pos at L_neg's scale: the forms' curvature in
    # L_neg then shows at float64 precision (with L_pos >> L_neg the softplus is linear there).
    with torch.no_grad():
        noise = torch.randn(degraded.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        batch = (degraded, model(degraded) + 3e-3 * noise)
    sampler = MismatchedExperts(model.num_prompts)
    seeds = seed_per_subset(m, r).values()

    def cprs(loss):
        with torch.no_grad():
            full = fast_cpl_step(model, batch, features, loss, sampler, m=m, negatives=negatives)
            per_subset = [fast_cpl_step(model, batch, features, loss, sampler, m=m, negatives=negatives,
                                        negatives_per_step=r, generator=torch.Generator().manual_seed(seed))
                          for seed in seeds]
        return full, per_subset

    # Put the hinge's kink at sample 0's full L_neg (some draws active, some not) and the softplus's
    # temperature at the scale of L_pos - L_neg: where the forms are linear the inequality is an
    # equality and says nothing.
    reference, _ = cprs(CPRLoss(alpha=1.0))
    margin = float(reference.l_neg[0] / reference.l_pos[0])
    tau = float((reference.l_pos - reference.l_neg).abs().mean())
    full, per_subset = cprs(CPRLoss(alpha=1.0, form=form, margin=margin, tau=tau))
    full, per_subset = full.cpr, [out.cpr for out in per_subset]
    mean = torch.stack(per_subset).mean()
    assert mean >= full - 1e-12 * full.abs()
    assert mean - full > 1e-9 * full.abs()       # strictly convex here: the gap is real


@pytest.mark.parametrize("neg_chunk", [None, 1])
def test_subsampled_step_is_the_step_over_its_negatives(features, neg_chunk):
    """Drawn by the step itself (one pass, level by level): the literal step on the r used negatives."""
    m, r = 4, 2
    model = make_model("tiny", 1, torch.float64)
    batch = make_batch(3, torch.float64, None)
    neg_weights = torch.rand(3, m, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    loss = CPRLoss(alpha=0.5, form="hinge", margin=2.0)
    sampler = MismatchedExperts(model.num_prompts)
    generator = torch.Generator().manual_seed(4)
    fast = fast_cpl_step(model, batch, features, loss, sampler, m=m, generator=generator,
                         neg_weights=neg_weights, negatives_per_step=r, neg_chunk=neg_chunk)
    subset = draw_negative_subset(m, r, torch.Generator().manual_seed(4))
    literal = literal_cpl_step(model, batch, features, loss, sampler, m=r, negatives=fast.negatives,
                               neg_weights=neg_weights[:, subset])
    assert len(fast.negatives) == r and fast.negative_images.shape[:2] == (r, 3)
    assert_same_step(fast, literal, model, 1e-10)
    # The full draw at this seed, restricted to the subset, gives the same negatives: the subset is
    # drawn first, then all m negatives as in a full step.
    generator = torch.Generator().manual_seed(4)
    draw_negative_subset(m, r, generator)
    full = fast_cpl_step(model, batch, features, loss, sampler, m=m, generator=generator)
    for used, t in zip(fast.negatives, subset):
        for a, b in zip(used, full.negatives[t]):
            assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("step", [loop_cpl_step, literal_cpl_step], ids=["loop", "literal"])
def test_every_step_draws_the_same_subset(features, step):
    """The loop and literal steps, given the same generator seed, use the slots and negatives the fast
    step uses, and give its loss and gradients (float64)."""
    m, r = 4, 2
    model = make_model("tiny", 1, torch.float64)
    batch = make_batch(3, torch.float64, [0, 1, 2])
    neg_weights = torch.rand(3, m, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5
    loss = CPRLoss(alpha=0.5, form="hinge", margin=2.0)
    sampler = MismatchedExperts(model.num_prompts)
    run = dict(m=m, neg_weights=neg_weights, negatives_per_step=r)
    fast = fast_cpl_step(model, batch, features, loss, sampler, generator=torch.Generator().manual_seed(8),
                         **run)
    other = step(model, batch, features, loss, sampler, generator=torch.Generator().manual_seed(8), **run)
    assert len(other.negatives) == r and other.negative_images.shape[:2] == (r, 3)
    assert_same_step(fast, other, model, 1e-10)
    # and the same slots as the fast step over given negatives
    negatives = given_negatives(model, batch, m)
    fast = fast_cpl_step(model, batch, features, loss, sampler, negatives=negatives,
                         generator=torch.Generator().manual_seed(8), **run)
    other = step(model, batch, features, loss, sampler, negatives=negatives,
                 generator=torch.Generator().manual_seed(8), **run)
    assert [id(n) for n in other.negatives] == [id(n) for n in fast.negatives]


@pytest.mark.parametrize("step", [fast_cpl_step, loop_cpl_step, literal_cpl_step],
                         ids=["fast", "loop", "literal"])
def test_bad_negatives_per_step(features, step):
    model = make_model("tiny", 1, torch.float64)
    batch = make_batch(2, torch.float64, None)
    sampler = MismatchedExperts(model.num_prompts)
    for bad in (0, -1, 5, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"negatives_per_step.*1 <= negatives_per_step <= m=4"):
            step(model, batch, features, CPRLoss(), sampler, m=4, negatives_per_step=bad)


def test_trainer_passes_negatives_per_step():
    seen = {}

    def step(model, batch, **kwargs):
        seen.update(kwargs)
        return "out"

    module = StepModule(torch.nn.Identity(), step)
    context = StepContext(features=object(), cpr_loss=object(), negative_sampler=None, m=4, generator=None,
                          negatives_per_step=2)
    assert module(None, context) == "out" and seen["negatives_per_step"] == 2
    seen.clear()
    context.negatives_per_step = None
    module(None, context)
    assert "negatives_per_step" not in seen

"""The literal (per-sample, Algorithm 1) CPL step against the batched per-negative loop step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpl_fast.losses import CPRLoss, PerceptualFeatures
from cpl_fast.models.spm import Routing
from cpl_fast.train import CPLStepOutput, MismatchedExperts, OtherTask, literal_cpl_step, loop_cpl_step


class TinyPromptNet(nn.Module):
    """A stand-in with the model interface: encode/decode, per-level routing, forced routing.

    Each level: ``probs = softmax(linear(mean_hw(h)))``, top-k (or dense), a prompt vector
    ``sum_j w_j bank[idx_j]`` added before a 3x3 conv.
    """

    def __init__(self, channels: int = 4, num_prompts: int = 5, top_k: int | None = 1, levels: int = 2,
                 seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self._build(channels, num_prompts, top_k, levels)
        self.calls = 0

    def _build(self, channels: int, num_prompts: int, top_k: int | None, levels: int) -> None:
        self.num_prompt_levels, self.num_prompts, self.top_k = levels, num_prompts, top_k
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.routers = nn.ModuleList(nn.Linear(channels, num_prompts) for _ in range(levels))
        self.banks = nn.ParameterList(nn.Parameter(torch.randn(num_prompts, channels)) for _ in range(levels))
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(levels))
        self.head = nn.Conv2d(channels, 3, 3, padding=1)

    def encode(self, x):
        return x, torch.tanh(self.stem(x))

    def decode(self, state, routing=None, return_routing=False):
        image, h = state
        routing = routing or [None] * self.num_prompt_levels
        used = []
        for level in range(self.num_prompt_levels):
            probs = torch.softmax(self.routers[level](h.mean((2, 3))), dim=1)
            if routing[level] is not None:
                chosen = Routing(routing[level].indices, routing[level].weights, probs)
            elif self.top_k is None:
                chosen = Routing(torch.arange(self.num_prompts).repeat(h.shape[0], 1), probs, probs)
            else:
                weights, indices = probs.topk(self.top_k, dim=1)
                chosen = Routing(indices, weights, probs)
            prompt = torch.einsum("bk,bkc->bc", chosen.weights, self.banks[level][chosen.indices])
            h = torch.tanh(self.convs[level](h + prompt[:, :, None, None]))
            used.append(chosen)
        out = image + 0.1 * self.head(h)
        return (out, used) if return_routing else out

    def forward(self, x, routing=None, return_routing=False):
        self.calls += 1
        return self.decode(self.encode(x), routing, return_routing)


def make_batch(batch=3, size=8, seed=0, tasks=None):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, size, size, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    degraded = (target + 0.2 * noise).clamp(0, 1)
    return degraded, target, tasks


@pytest.fixture(scope="module")
def features():
    return PerceptualFeatures.random_vgg19(seed=0, layers=("relu1_1", "relu2_1")).double()


def grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def assert_same_step(a: CPLStepOutput, b: CPLStepOutput, model: nn.Module) -> None:
    for name in ("loss", "l1", "cpr", "l_pos", "l_neg", "restored"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-13, msg=name)
    for level, (ra, rb) in enumerate(zip(a.routing, b.routing)):
        assert torch.equal(ra.indices, rb.indices), level
        torch.testing.assert_close(ra.weights, rb.weights, rtol=1e-10, atol=1e-14)
    for ga, gb in zip(grads(model, a.loss), grads(model, b.loss)):
        if ga is None or gb is None:
            assert ga is None and gb is None
        else:
            torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("form,top_k,weighted", [("difference", 1, False), ("ratio", 2, True),
                                                 ("difference", None, True)])
def test_literal_equals_loop(features, form, top_k, weighted):
    model = TinyPromptNet(top_k=top_k).double()
    batch = make_batch()
    sampler = MismatchedExperts(model.num_prompts)
    with torch.no_grad():
        _, routing = model(batch[0], return_routing=True)
    negatives = sampler(routing, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    neg_weights = torch.rand(3, 3, dtype=torch.float64, generator=g) if weighted else None
    loss = CPRLoss(alpha=0.5, form=form)
    literal = literal_cpl_step(model, batch, features, loss, sampler, m=3, negatives=negatives,
                               neg_weights=neg_weights)
    loop = loop_cpl_step(model, batch, features, loss, sampler, m=3, negatives=negatives,
                         neg_weights=neg_weights)
    assert literal.negatives is negatives and loop.negatives is negatives
    assert_same_step(literal, loop, model)


def test_literal_step_is_algorithm_1(features):
    """B (1 + m) forwards, and the loss assembled by hand from per-sample pieces."""
    model = TinyPromptNet().double()
    degraded, target, _ = batch = make_batch(batch=2)
    sampler = MismatchedExperts(model.num_prompts)
    loss = CPRLoss(alpha=0.25, layer_weights=[0.5, 2.0])
    model.calls = 0
    out = literal_cpl_step(model, batch, features, loss, sampler, m=2,
                           generator=torch.Generator().manual_seed(3))
    assert model.calls == 2 * (1 + 2)
    model.calls = 0
    loop_cpl_step(model, batch, features, loss, sampler, m=2, negatives=out.negatives)
    assert model.calls == 1 + 2

    with torch.no_grad():
        per_sample = []
        for b in range(2):
            x, y = degraded[b:b + 1], target[b:b + 1]
            positive = model(x)
            negative_images = [model(x, routing=[Routing(r.indices[b:b + 1], r.weights[b:b + 1])
                                                 for r in neg]) for neg in out.negatives]
            reg = 0.0
            for weight, f_pos, f_gt, f_negs in zip([0.5, 2.0], features(positive), features(y),
                                                    zip(*[features(image) for image in negative_images])):
                l_pos = (f_pos - f_gt).square().mean()
                l_neg = sum((f_neg - f_pos).square().mean() for f_neg in f_negs) / 2
                reg = reg + weight * (l_pos - l_neg)
            per_sample.append(F.l1_loss(positive, y) + 0.25 * reg)
    torch.testing.assert_close(out.loss, sum(per_sample) / 2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, out.l1 + out.cpr)
    assert out.l_pos.shape == (2,) and out.l_neg.shape == (2,) and out.restored.shape == degraded.shape


def test_same_generator_same_negatives_and_loss(features):
    model = TinyPromptNet(top_k=1).double()
    batch = make_batch(tasks=torch.tensor([0, 1, 2]))
    loss = CPRLoss()
    run = lambda step: step(model, batch, features, loss, OtherTask(num_tasks=3), m=2,  # noqa: E731
                            generator=torch.Generator().manual_seed(11))
    literal, loop = run(literal_cpl_step), run(loop_cpl_step)
    for neg_a, neg_b in zip(literal.negatives, loop.negatives):
        for ra, rb in zip(neg_a, neg_b):
            assert torch.equal(ra.indices, rb.indices)
            torch.testing.assert_close(ra.weights, rb.weights, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(literal.loss, loop.loss, rtol=1e-10, atol=1e-13)


def test_literal_equals_loop_on_the_tiny_preset(features):
    models = pytest.importorskip("cpl_fast.models")
    if not hasattr(models, "build_model"):
        pytest.skip("cpl_fast.models has no build_model")
    model = models.build_model("tiny").double()
    batch = make_batch(batch=2, size=8, seed=4)
    sampler = MismatchedExperts(model.num_prompts)
    with torch.no_grad():
        _, routing = model(batch[0], return_routing=True)
    negatives = sampler(routing, 2, generator=torch.Generator().manual_seed(2))
    loss = CPRLoss(alpha=0.5)
    literal = literal_cpl_step(model, batch, features, loss, sampler, m=2, negatives=negatives)
    loop = loop_cpl_step(model, batch, features, loss, sampler, m=2, negatives=negatives)
    assert_same_step(literal, loop, model)


@pytest.mark.parametrize("step", [literal_cpl_step, loop_cpl_step])
def test_clear_errors(features, step):
    model = TinyPromptNet().double()
    batch = make_batch(batch=2)
    sampler = MismatchedExperts(model.num_prompts)
    with torch.no_grad():
        _, routing = model(batch[0], return_routing=True)
    negatives = sampler(routing, 2)
    with pytest.raises(ValueError, match="expected m=3 negatives, got 2"):
        step(model, batch, features, CPRLoss(), sampler, m=3, negatives=negatives)
    with pytest.raises(ValueError, match="prompt levels"):
        step(model, batch, features, CPRLoss(), sampler, m=2, negatives=[neg[:1] for neg in negatives])
    with pytest.raises(ValueError, match="neg_weights"):
        step(model, batch, features, CPRLoss(), sampler, m=2, negatives=negatives,
             neg_weights=torch.ones(2, 3))
    with pytest.raises(ValueError, match="need task_ids"):
        step(model, batch, features, CPRLoss(), OtherTask(3), m=2)
    with pytest.raises(ValueError, match="batch sizes differ"):
        step(model, (batch[0], batch[1][:1]), features, CPRLoss(), sampler, m=2)

"""fast_cpl_step (shared encoder, one decoder pass) against the literal Algorithm 1 step, and PromptNAFNet."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cpl_fast.losses import CPRLoss, PerceptualFeatures
from cpl_fast.models import NAFNetState, PromptNAFNet, Routing, build_model, map_state
from cpl_fast.train import MismatchedExperts, OtherTask, fast_cpl_step, literal_cpl_step

SIZE = 8


def make_model(name: str, top_k: int, dtype: torch.dtype) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = build_model(name, top_k=top_k)
        # NAFNet's residual scales start at zero (each block the identity); make every block count.
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith(("beta", "gamma")):
                    param.normal_(0.0, 0.5)
    return model.to(dtype)


def make_batch(batch: int, dtype: torch.dtype, tasks: list[int] | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    degraded = (target + 0.2 * noise).clamp(0, 1)
    pair = (degraded.to(dtype), target.to(dtype))
    return pair if tasks is None else (*pair, torch.tensor(tasks))


@pytest.fixture(scope="module")
def features():
    return PerceptualFeatures.random_vgg19(seed=0, layers=("relu1_1", "relu2_1"))


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``: a tensor-wide relative error, robust to entries that are nearly zero."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def assert_same_step(fast, literal, model: nn.Module, tol: float) -> None:
    for name in ("loss", "l1", "cpr", "l_pos", "l_neg", "restored"):
        assert max_relative_error(getattr(fast, name), getattr(literal, name)) <= tol, name
    for level, (rf, rl) in enumerate(zip(fast.routing, literal.routing)):
        assert torch.equal(rf.indices, rl.indices), level
        assert max_relative_error(rf.weights, rl.weights) <= tol, level
    for t, (nf, nl) in enumerate(zip(fast.negatives, literal.negatives)):
        for level, (rf, rl) in enumerate(zip(nf, nl)):
            assert torch.equal(rf.indices, rl.indices), (t, level)
            assert max_relative_error(rf.weights, rl.weights) <= tol, (t, level)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads_fast = torch.autograd.grad(fast.loss, [p for _, p in params], allow_unused=True)
    grads_literal = torch.autograd.grad(literal.loss, [p for _, p in params], allow_unused=True)
    checked = 0
    for (name, _), gf, gl in zip(params, grads_fast, grads_literal):
        assert (gf is None) == (gl is None), name
        if gl is not None:
            assert max_relative_error(gf, gl) <= tol, name
            checked += 1
    assert checked == len(params)    # every parameter (routers, expert banks included) gets a gradient


# Every value of every factor at least once: model, dtype, form, sampler, m, k, neg_weights, neg_chunk,
# and negatives given vs drawn with the same generator seed.
CASES = [
    # model, dtype, form, sampler, m, k, weighted, neg_chunk, given
    ("tiny", torch.float64, "difference", "mismatched_experts", 2, 1, False, None, False),
    ("tiny", torch.float64, "ratio", "other_task", 2, 2, True, 1, False),
    ("nafnet_tiny", torch.float64, "difference", "mismatched_experts", 4, 2, True, 3, True),
    ("nafnet_tiny", torch.float64, "ratio", "other_task", 1, 1, False, None, False),
    ("tiny", torch.float32, "difference", "mismatched_experts", 1, 1, True, None, True),
    ("nafnet_tiny", torch.float32, "difference", "mismatched_experts", 2, 1, False, 1, False),
]


@pytest.mark.parametrize("name,dtype,form,sampler_name,m,k,weighted,neg_chunk,given", CASES)
def test_fast_equals_literal(features, name, dtype, form, sampler_name, m, k, weighted, neg_chunk, given):
    model = make_model(name, k, dtype)
    feats = features.to(dtype)
    size = 2 if name == "tiny" else 3    # the Restormer preset is the slower one on the CPU
    tasks = [0, 1, 2][:size] if sampler_name == "other_task" else None
    batch = make_batch(size, dtype, tasks)
    make_sampler = (lambda: MismatchedExperts(model.num_prompts)) if tasks is None else (lambda: OtherTask(3))
    g = torch.Generator().manual_seed(5)
    neg_weights = torch.rand(size, m, generator=g, dtype=torch.float64).to(dtype) + 0.5 if weighted else None
    loss = CPRLoss(alpha=0.5, form=form)
    negatives = None
    if given:
        with torch.no_grad():
            _, routing = model(batch[0], return_routing=True)
        negatives = make_sampler()(routing, m, task_ids=batch[2] if tasks else None,
                                   generator=torch.Generator().manual_seed(9))
    run = dict(m=m, negatives=negatives, neg_weights=neg_weights)
    seed = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    literal = literal_cpl_step(model, batch, feats, loss, make_sampler(), generator=seed(), **run)
    fast = fast_cpl_step(model, batch, feats, loss, make_sampler(), generator=seed(), neg_chunk=neg_chunk,
                         **run)
    if given:
        assert fast.negatives is negatives
    assert_same_step(fast, literal, model, 1e-10 if dtype == torch.float64 else 1e-4)


class Counting(nn.Module):
    """Wraps a model and records the batch size of every encode and decode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_prompt_levels, self.num_prompts = model.num_prompt_levels, model.num_prompts
        self.top_k = model.top_k
        self.accepts_routing_callables = getattr(model, "accepts_routing_callables", False)
        self.encodes: list[int] = []
        self.decodes: list[int] = []

    def encode(self, x):
        self.encodes.append(x.shape[0])
        return self.model.encode(x)

    def decode(self, state, routing=None, return_routing=False):
        self.decodes.append(state.image.shape[0])
        return self.model.decode(state, routing, return_routing)


@pytest.mark.parametrize("neg_chunk,decodes", [(None, [3 * 4]), (2, [3 * 3, 3 * 1]), (4, [3 * 4])])
def test_one_encode_and_one_decoder_pass(features, neg_chunk, decodes):
    model = Counting(make_model("nafnet_tiny", 1, torch.float64))
    batch = make_batch(3, torch.float64, None)
    fast_cpl_step(model, batch, features.double(), CPRLoss(), MismatchedExperts(5), m=3, neg_chunk=neg_chunk,
                  generator=torch.Generator().manual_seed(0))
    assert model.encodes == [3] and model.decodes == decodes


def test_protocol_model_without_routing_callables(features):
    """Any EncodeDecodeModel: positives decoded first, then the negatives, same result as literal."""
    model = Counting(make_model("nafnet_tiny", 1, torch.float64))
    model.accepts_routing_callables = False
    batch = make_batch(2, torch.float64, [0, 1])
    loss = CPRLoss(alpha=0.3)
    literal = literal_cpl_step(model.model, batch, features.double(), loss, OtherTask(2), m=2,
                               generator=torch.Generator().manual_seed(1))
    fast = fast_cpl_step(model, batch, features.double(), loss, OtherTask(2), m=2,
                         generator=torch.Generator().manual_seed(1))
    assert model.encodes == [2] and model.decodes == [2, 4]
    assert_same_step(fast, literal, model.model, 1e-10)


def test_sample_level_reproduces_the_full_call():
    g = torch.Generator().manual_seed(0)
    routings = []
    for _ in range(3):
        probs = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), 1)
        weights, indices = probs.topk(2, dim=1)
        routings.append(Routing(indices, weights, None))
    sampler = MismatchedExperts(6)
    full = sampler(routings, 4, generator=torch.Generator().manual_seed(7))
    level_gen = torch.Generator().manual_seed(7)
    per_level = [sampler.sample_level(level, r, 4, generator=level_gen) for level, r in enumerate(routings)]
    for t in range(4):
        for level in range(3):
            assert torch.equal(full[t][level].indices, per_level[level][t].indices)
            assert torch.equal(full[t][level].weights, per_level[level][t].weights)
    with pytest.raises(ValueError, match=r"m=6.*n=6"):
        sampler.sample_level(0, routings[0], 6)


def test_fast_step_clear_errors(features):
    model = make_model("nafnet_tiny", 1, torch.float64)
    batch = make_batch(2, torch.float64, None)
    sampler = MismatchedExperts(5)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="neg_chunk"):
            fast_cpl_step(model, batch, features.double(), CPRLoss(), sampler, m=2, neg_chunk=bad)
    with pytest.raises(ValueError, match="positive int"):
        fast_cpl_step(model, batch, features.double(), CPRLoss(), sampler, m=0)
    with pytest.raises(ValueError, match="neg_weights"):
        fast_cpl_step(model, batch, features.double(), CPRLoss(), sampler, m=2, neg_weights=torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected m=3 negatives"):
        fast_cpl_step(model, batch, features.double(), CPRLoss(), sampler, m=3,
                      negatives=[[Routing(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1))] * 2] * 2)


def test_routing_callable_must_return_a_routing():
    spm = build_model("nafnet_tiny").prompts[0]
    with pytest.raises(TypeError, match="must return a Routing"):
        spm(torch.rand(2, spm.linear_layer.in_features, 2, 2), lambda own: own.indices)
    # The callable sees the router's own choice; what it returns is used, with the router's probs.
    x = torch.rand(2, spm.linear_layer.in_features, 2, 2)
    seen = []
    forced = Routing(torch.tensor([[3], [0]]), torch.tensor([[0.5], [2.0]]))
    prompt, used = spm(x, lambda own: seen.append(own) or forced)
    own = spm(x)[1]
    assert torch.equal(seen[0].indices, own.indices) and torch.equal(used.indices, forced.indices)
    torch.testing.assert_close(used.probs, own.probs)
    torch.testing.assert_close(prompt, spm(x, forced)[0])


def test_nafnet_encode_decode_and_routing():
    model = make_model("nafnet_tiny", 1, torch.float64)
    assert isinstance(model, PromptNAFNet) and model.num_prompt_levels == 2
    x = torch.rand(3, 3, SIZE, SIZE, dtype=torch.float64)
    state = model.encode(x)
    assert isinstance(state, NAFNetState) and len(state.skips) == 2
    out, routing = model(x, return_routing=True)
    assert out.shape == x.shape and len(routing) == 2
    torch.testing.assert_close(model.decode(state), out, rtol=0, atol=0)
    # Decoding the repeated state row-block by row-block gives the same rows.
    repeated = map_state(lambda t: t.repeat(2, *([1] * (t.dim() - 1))), state)
    torch.testing.assert_close(model.decode(repeated)[3:], out, rtol=1e-12, atol=1e-12)
    # A forced routing changes the restoration; forcing the model's own choice does not.
    own = [Routing(r.indices, r.weights) for r in routing]
    torch.testing.assert_close(model(x, routing=own), out, rtol=1e-12, atol=1e-12)
    other = [Routing((r.indices + 1) % 5, r.weights) for r in routing]
    assert not torch.allclose(model(x, routing=other), out)


def test_nafnet_gradcheck():
    model = build_model("nafnet_tiny", width=4, prompt_dims=(4, 2), top_k=None).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                param.normal_()
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: model(inp), (x,), fast_mode=True)


def test_nafnet_clear_errors():
    model = build_model("nafnet_tiny")
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(1, 3, 6, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 4, 8, 8))
    with pytest.raises(TypeError, match="expected a tensor"):
        model.encode([1.0])
    with pytest.raises(ValueError, match="2 entries"):
        model(torch.rand(1, 3, 8, 8), routing=[None])
    with pytest.raises(ValueError, match="same number"):
        PromptNAFNet(enc_blocks=(1, 1), dec_blocks=(1,))
    with pytest.raises(ValueError, match="prompt_dims needs 2"):
        PromptNAFNet(width=8, enc_blocks=(1, 1), dec_blocks=(1, 1), prompt_dims=(4,))

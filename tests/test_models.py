"""Tests of cpl_fast.models: blocks, the Sparse Prompt Module, SparsePromptIR, folding, registry."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from cpl_fast.models import (
    MODELS,
    PRESETS,
    EncodeDecodeModel,
    Routing,
    SparsePromptIR,
    SparsePromptModule,
    build_model,
    map_state,
    register_model,
)
from cpl_fast.models.restormer import Downsample, LayerNorm, Upsample

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "promptir_state_dict.txt"
UNUSED = {"chnl_reduce1.weight", "chnl_reduce2.weight", "chnl_reduce3.weight",
          "reduce_noise_channel_1.weight", "reduce_noise_channel_2.weight", "reduce_noise_channel_3.weight"}
PARAMS_PER_PROMPT = 64 * 64 * 64 + 128 * 32 * 32 + 320 * 16 * 16     # one expert at each of the 3 levels


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """key -> shape of the published PromptIR(decoder=True) state dict (548 entries)."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference state-dict listing not found at {REFERENCE}")
    shapes = {}
    for line in REFERENCE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return shapes


class OfficialPromptGenBlock(nn.Module):
    """PromptIR's published prompt block, kept verbatim in spirit: it repeats the bank per sample."""

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int) -> None:
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        emb = x.mean(dim=(-2, -1))
        prompt_weights = F.softmax(self.linear_layer(emb), dim=1)
        prompt = (prompt_weights.unsqueeze(-1).unsqueeze(-1).unsqueeze(-1)
                  * self.prompt_param.unsqueeze(0).repeat(b, 1, 1, 1, 1, 1).squeeze(1))
        prompt = torch.sum(prompt, dim=1)
        prompt = F.interpolate(prompt, (h, w), mode="bilinear")
        return self.conv3x3(prompt)


def manual_prompt(spm: SparsePromptModule, indices: torch.Tensor, weights: torch.Tensor,
                  size: tuple[int, int]) -> torch.Tensor:
    """The SPM's prompt for a given routing, written out with a loop."""
    rows = []
    for b in range(indices.shape[0]):
        mixed = sum(weights[b, j] * spm.prompt_param[indices[b, j]] for j in range(indices.shape[1]))
        rows.append(F.interpolate(mixed[None], size=size, mode="bilinear", align_corners=False))
    return spm.conv3x3(torch.cat(rows))


def spaced_router(spm: SparsePromptModule) -> None:
    """Make the router's probabilities well separated, so a small perturbation never changes top-k."""
    with torch.no_grad():
        spm.linear_layer.weight.mul_(0.1)
        spm.linear_layer.bias.copy_(torch.randperm(spm.num_prompts).to(spm.linear_layer.bias) * 0.7)


def tiny(preset: str = "tiny", dtype: torch.dtype = torch.float64, **overrides) -> SparsePromptIR:
    model = build_model(preset, **overrides).to(dtype)
    for spm in model.prompt_modules():
        spaced_router(spm)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------- blocks

def test_layernorm_is_per_pixel_layer_norm_over_channels():
    norm = LayerNorm(6).double()
    with torch.no_grad():
        norm.body.weight.copy_(torch.randn(6))
        norm.body.bias.copy_(torch.randn(6))
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.body.weight, norm.body.bias, eps=1e-5)
    torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2))


def test_down_and_upsample_shapes():
    x = torch.randn(2, 8, 6, 10)
    assert Downsample(8)(x).shape == (2, 16, 3, 5)
    assert Upsample(8)(x).shape == (2, 4, 12, 20)


# ------------------------------------------------------------------------------------------------- SPM

@pytest.mark.parametrize("size", [(7, 5), (16, 16), (3, 9)])
def test_dense_spm_equals_published_prompt_block(size):
    official = OfficialPromptGenBlock(prompt_dim=6, prompt_len=4, prompt_size=5, lin_dim=10).double()
    spm = SparsePromptModule(6, 4, 5, 10, top_k=None).double()
    with torch.no_grad():
        spm.prompt_param.copy_(official.prompt_param[0])
        spm.linear_layer.load_state_dict(official.linear_layer.state_dict())
        spm.conv3x3.load_state_dict(official.conv3x3.state_dict())
    x = torch.randn(3, 10, *size, dtype=torch.float64)
    prompt, routing = spm(x)
    torch.testing.assert_close(prompt, official(x), rtol=1e-12, atol=1e-12)
    assert routing.indices.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(routing.weights, routing.probs)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_invariants(k, renormalize):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # k=1 + renormalize warns; tested separately
        spm = SparsePromptModule(4, 5, 3, 8, top_k=k, renormalize=renormalize).double()
    x = torch.randn(6, 8, 4, 6, dtype=torch.float64)
    prompt, routing = spm(x)
    assert prompt.shape == (6, 4, 4, 6)
    assert routing.indices.shape == routing.weights.shape == (6, k)
    assert routing.indices.dtype == torch.int64
    probs = routing.probs
    torch.testing.assert_close(probs, F.softmax(spm.linear_layer(x.mean((-2, -1))), dim=1))
    for b in range(6):
        assert len(set(routing.indices[b].tolist())) == k
    kept = probs.gather(1, routing.indices)
    # The kept experts are the k most probable ones.
    assert torch.all(kept.min(1).values >= probs.topk(k, 1).values[:, -1])
    if renormalize:
        torch.testing.assert_close(routing.weights, kept / kept.sum(1, keepdim=True))
        torch.testing.assert_close(routing.weights.sum(1), torch.ones(6, dtype=torch.float64))
    else:
        torch.testing.assert_close(routing.weights, kept)
    torch.testing.assert_close(prompt, manual_prompt(spm, routing.indices, routing.weights, (4, 6)))


def test_renormalize_with_top1_warns_router_cannot_learn():
    with pytest.warns(UserWarning, match="no gradient"):
        SparsePromptModule(4, 5, 3, 8, top_k=1, renormalize=True)


@pytest.mark.parametrize("k", [0, 6, -1, 2.0])
def test_top_k_out_of_range_is_rejected(k):
    with pytest.raises(ValueError, match=rf"k={re.escape(repr(k))}, n=5"):
        SparsePromptModule(4, 5, 3, 8, top_k=k)


def test_forced_routing_uses_the_given_experts():
    spm = SparsePromptModule(4, 5, 3, 8, top_k=1).double()
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    forced = Routing(torch.tensor([[4, 0], [2, 2], [1, 3]]), torch.rand(3, 2, dtype=torch.float64))
    prompt, routing = spm(x, forced)
    assert torch.equal(routing.indices, forced.indices) and torch.equal(routing.weights, forced.weights)
    torch.testing.assert_close(routing.probs, spm(x)[1].probs)
    torch.testing.assert_close(prompt, manual_prompt(spm, forced.indices, forced.weights, (5, 7)))
    # Weights in another precision are mixed in the bank's.
    low, _ = spm(x, Routing(forced.indices, forced.weights.float()))
    assert low.dtype == torch.float64
    torch.testing.assert_close(low, prompt, rtol=1e-6, atol=1e-6)


def test_forced_routing_is_validated():
    spm = SparsePromptModule(4, 5, 3, 8, top_k=1)
    x = torch.randn(2, 8, 4, 4)
    w = torch.rand(2, 1)
    with pytest.raises(TypeError, match="int64"):
        spm(x, Routing(torch.zeros(2, 1, dtype=torch.int32), w))
    with pytest.raises(ValueError, match=r"\(B=2, k\) with 1 <= k <= n=5, got \(3, 1\)"):
        spm(x, Routing(torch.zeros(3, 1, dtype=torch.int64), torch.rand(3, 1)))
    with pytest.raises(ValueError, match=r"got \(2, 6\)"):
        spm(x, Routing(torch.zeros(2, 6, dtype=torch.int64), torch.rand(2, 6)))
    with pytest.raises(ValueError, match="weights shape"):
        spm(x, Routing(torch.zeros(2, 1, dtype=torch.int64), torch.rand(2, 2)))
    with pytest.raises(ValueError, match=r"\[0, n=5\).*\[0, 5\]"):
        spm(x, Routing(torch.tensor([[0], [5]]), w))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        spm(x, Routing(torch.tensor([[-1], [1]]), w))


@pytest.mark.parametrize("top_k", [None, 2])
def test_spm_gradcheck(top_k):
    spm = SparsePromptModule(prompt_dim=2, prompt_len=4, prompt_size=3, lin_dim=3, top_k=top_k).double()
    spaced_router(spm)
    params = {name: p.detach().clone().requires_grad_() for name, p in spm.named_parameters()}
    names = list(params)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *values):
        prompt, routing = functional_call(spm, dict(zip(names, values)), (x,))
        return prompt, routing.weights

    assert torch.autograd.gradcheck(fn, (x, *params.values()))


# --------------------------------------------------------------------------------------- SparsePromptIR

@pytest.mark.parametrize("preset", ["tiny", "tiny_dense"])
@pytest.mark.parametrize("size", [(24, 40), (16, 8), (8, 32)])
def test_tiny_model_shapes_on_non_square_sizes(preset, size):
    model = build_model(preset)
    x = torch.randn(2, 3, *size)
    out, routing = model(x, return_routing=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    k = model.num_prompts if model.top_k is None else model.top_k
    assert len(routing) == model.num_prompt_levels == 3
    for r in routing:
        assert r.indices.shape == r.weights.shape == (2, k)
        assert r.probs.shape == (2, model.num_prompts)


def test_encode_decode_equals_forward_and_state_expands():
    model = tiny()
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    out, routing = model(x, return_routing=True)
    state = model.encode(x)
    assert state._fields == ("image", "enc1", "enc2", "enc3", "latent")
    out2, routing2 = model.decode(state, return_routing=True)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    for a, b in zip(routing, routing2):
        assert torch.equal(a.indices, b.indices)
    # Each sample decoded three times (as a contrastive step does) gives the same rows.
    expanded = map_state(lambda t: t.repeat_interleave(3, 0), state)
    assert expanded.latent.shape[0] == 6 and type(expanded) is type(state)
    torch.testing.assert_close(model.decode(expanded), out.repeat_interleave(3, 0))
    assert isinstance(model, EncodeDecodeModel)


def test_forced_routing_through_the_model():
    model = tiny()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, own = model(x, return_routing=True)
    # Forcing the router's own choice changes nothing.
    torch.testing.assert_close(model(x, routing=[Routing(r.indices, r.weights) for r in own]), out)
    # Forcing other experts at one level only: the returned routing reports them; the output moves.
    other = Routing((own[1].indices + 1) % model.num_prompts, own[1].weights)
    out2, used = model(x, routing=[None, other, None], return_routing=True)
    assert torch.equal(used[1].indices, other.indices) and torch.equal(used[0].indices, own[0].indices)
    assert not torch.allclose(out2, out)
    # Manual: the prompt2 level must see exactly the forced experts' prompt.
    captured = {}
    handle = model.prompt2.register_forward_hook(
        lambda m, args, output: captured.update(prompt=output[0], x=args[0]))
    model(x, routing=[None, other, None])
    handle.remove()
    size = captured["x"].shape[-2:]
    expected = manual_prompt(model.prompt2, other.indices, other.weights, size)
    torch.testing.assert_close(captured["prompt"], expected)
    with pytest.raises(ValueError, match="3 entries"):
        model(x, routing=[None, None])


def test_model_gradients_by_finite_differences():
    model = tiny()
    x = torch.randn(1, 3, 16, 8, dtype=torch.float64)
    weight = torch.randn(1, 3, 16, 8, dtype=torch.float64)
    # Small tensors on both sides of the prompts (numerical Jacobians cost two forwards per element).
    names = ["prompt3.linear_layer.bias", "prompt2.linear_layer.bias", "prompt1.linear_layer.bias",
             "noise_level2.attn.temperature", "decoder_level1.0.attn.temperature",
             "noise_level1.norm1.body.bias",
             "encoder_level1.0.attn.temperature"]
    params = dict(model.named_parameters())
    values = tuple(params[n].detach().clone().requires_grad_() for n in names)

    def loss(*values):
        return (functional_call(model, dict(zip(names, values)), (x,)) * weight).sum()

    assert torch.autograd.gradcheck(loss, values)


def test_prompt_bank_gets_gradient_only_through_selected_experts():
    model = tiny()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, routing = model(x, return_routing=True)
    out.square().sum().backward()
    grad = model.prompt2.prompt_param.grad
    used = set(routing[1].indices.flatten().tolist())
    for e in range(model.num_prompts):
        assert (grad[e].abs().sum() > 0) == (e in used)
    assert model.prompt2.linear_layer.weight.grad.abs().sum() > 0     # raw weights: the router learns


def test_cpl_parameter_count_matches_the_paper():
    model = build_model("cpl")
    assert sum(p.numel() for p in model.parameters()) == 35_376_967
    more = build_model("cpl", num_prompts=10)
    assert more.num_prompts == 10 and more.prompt1.prompt_param.shape == (10, 64, 64, 64)
    router_per_prompt = (96 + 1) + (192 + 1) + (384 + 1)                  # one row of each linear_layer
    added = 5 * (PARAMS_PER_PROMPT + router_per_prompt)
    assert sum(p.numel() for p in more.parameters()) == 35_376_967 + added


def test_state_dict_matches_published_keys_and_shapes():
    shapes = reference_shapes()
    assert len(shapes) == 548
    used = {key: shape for key, shape in shapes.items() if key not in UNUSED}
    assert len(used) == 542
    ours = {key: tuple(value.shape) for key, value in build_model("promptir").state_dict().items()}
    assert set(ours) == set(used)
    for key, shape in used.items():
        if key.endswith("prompt_param"):
            assert shape[0] == 1 and ours[key] == shape[1:], key
        else:
            assert ours[key] == shape, key


# ---------------------------------------------------------------------------------------------- folding

def set_fold(model: SparsePromptIR, fold: bool) -> None:
    for spm in model.prompt_modules():
        spm.fold = fold


@pytest.mark.parametrize("preset", ["tiny", "tiny_dense"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_folded_inference_equals_unfolded(preset, dtype, tol):
    model = tiny(preset, dtype).eval()
    x = torch.randn(3, 3, 24, 16, dtype=dtype)
    with torch.no_grad():
        set_fold(model, False)
        expected, routing = model(x, return_routing=True)
        assert all(not spm._fold_cache for spm in model.prompt_modules())
        set_fold(model, True)
        folded = model(x)
        assert all(len(spm._fold_cache) == 1 for spm in model.prompt_modules())
        again = model(x)                                                   # served from the cache
        forced = [Routing((r.indices + 2) % model.num_prompts, r.weights) for r in routing]
        forced_folded = model(x, routing=forced)
        set_fold(model, False)
        forced_plain = model(x, routing=forced)
    assert rel_err(folded, expected) < tol
    assert torch.equal(again, folded)
    assert rel_err(forced_folded, forced_plain) < tol


def test_fold_cache_keyed_by_size():
    model = tiny().eval()
    with torch.no_grad():
        for size in [(16, 16), (8, 24), (16, 16)]:
            x = torch.randn(1, 3, *size, dtype=torch.float64)
            folded = model(x)
            set_fold(model, False)
            assert rel_err(folded, model(x)) < 1e-10
            set_fold(model, True)
    assert len(model.prompt1._fold_cache) == 2


def test_folding_under_autocast_has_its_own_cache_entry():
    model = tiny(dtype=torch.float32).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
            set_fold(model, False)
            low_plain = model(x)
            set_fold(model, True)
    assert len(model.prompt1._fold_cache) == 2
    assert model.prompt1._fold_cache[(8, 8, torch.bfloat16)].dtype == torch.bfloat16
    assert rel_err(low.float(), low_plain.float()) < 2e-2
    assert rel_err(low.float(), full) < 5e-2


def test_fold_cache_invalidated_by_optimizer_step_and_load_state_dict():
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    # Eval mode with grad enabled takes the differentiable path, so training through it works.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    assert model.prompt1.prompt_param.grad is not None
    optimizer.step()
    with torch.no_grad():
        after = model(x)
        set_fold(model, False)
        expected = model(x)
        set_fold(model, True)
    assert not torch.allclose(after, before)
    assert rel_err(after, expected) < 1e-10

    other = tiny()
    model.load_state_dict(other.state_dict())
    other.eval()
    with torch.no_grad():
        assert rel_err(model(x), other(x)) < 1e-10


def test_train_clears_fold_cache_and_training_never_folds():
    model = tiny().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert model.prompt3._fold_cache
    model.train()
    assert not model.prompt3._fold_cache
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert not model.prompt3._fold_cache


# ----------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("shape, match", [
    ((3, 16, 16), r"\(B, 3, H, W\), got shape \(3, 16, 16\)"),
    ((1, 4, 16, 16), r"got shape \(1, 4, 16, 16\)"),
    ((1, 3, 20, 16), r"multiples of 8.*20x16"),
    ((1, 3, 16, 12), r"multiples of 8.*16x12"),
])
def test_bad_inputs_are_rejected(shape, match):
    model = build_model("tiny")
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_bad_model_arguments_are_rejected():
    with pytest.raises(ValueError, match="k=6, n=5"):
        build_model("tiny", top_k=6)
    with pytest.raises(ValueError, match="heads needs 4 entries"):
        build_model("tiny", heads=(1, 1, 2))


# ------------------------------------------------------------------------------------ registry/presets

def test_presets_and_config_mappings():
    assert set(PRESETS) >= {"promptir", "cpl", "tiny", "tiny_dense"}
    assert build_model("promptir", dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1).top_k is None
    model = build_model({"preset": "tiny", "top_k": 2, "num_prompts": 3})
    assert (model.top_k, model.num_prompts) == (2, 3)
    from_yaml = build_model({"type": "SparsePromptIR", "dim": 8, "num_blocks": [1, 1, 1, 1],
                             "heads": [1, 1, 1, 1],
                             "num_refinement_blocks": 1, "prompt_dims": [4, 4, 4], "prompt_sizes": [4, 4, 4]})
    assert from_yaml(torch.randn(1, 3, 8, 8)).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="unknown model type 'Nope'"):
        build_model({"type": "Nope"})
    with pytest.raises(TypeError):
        build_model(3)


def test_register_model():
    assert MODELS["SparsePromptIR"] is SparsePromptIR

    @register_model(name="_test_identity")
    class Identity(nn.Module):
        def forward(self, x):
            return x

    try:
        assert isinstance(build_model({"type": "_test_identity"}), Identity)
        with pytest.raises(ValueError, match="already registered"):
            register_model(type("Other", (nn.Module,), {}), name="_test_identity")
    finally:
        del MODELS["_test_identity"]


def test_map_state_containers():
    state = {"a": torch.ones(2), "b": (torch.zeros(1), [torch.ones(3)])}
    doubled = map_state(lambda t: t + 1, state)
    assert doubled["a"].tolist() == [2, 2] and doubled["b"][1][0].tolist() == [2, 2, 2]
    assert isinstance(doubled["b"], tuple) and isinstance(doubled["b"][1], list)
    with pytest.raises(TypeError, match="cannot map over a int"):
        map_state(lambda t: t, {"a": 1})


def test_model_traces_as_one_graph():
    # fullgraph: the routing checks and the fold cache must not break the graph (eager backend: no codegen).
    model = build_model("tiny")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 16, 16)
    forced = [Routing(torch.tensor([[1], [3]]), torch.rand(2, 1)) for _ in range(3)]
    torch.testing.assert_close(compiled(x, routing=forced), model(x, routing=forced))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_config_model_section_is_translated_in_one_place():
    from cpl_fast.config import load_config, model_k_n
    from cpl_fast.models.registry import model_from_config, section_kwargs, section_routing

    assert section_routing({"preset": "cpl"}) == (1, 5)
    assert section_routing({"preset": "promptir"}) == (None, 5)
    assert section_routing({"preset": "tiny", "top_k": "all", "num_prompts": 7}) == (None, 7)
    assert section_routing({"preset": "tiny_dense", "top_k": 2}) == (2, 5)
    assert section_kwargs({"preset": "tiny", "top_k": "all", "num_prompts": 3, "overrides": {"dim": 16}}) == \
        {"dim": 16, "top_k": None, "num_prompts": 3}
    with pytest.raises(ValueError, match="unknown; choose one of"):
        section_routing({"preset": "nope"})
    model = model_from_config({"preset": "tiny", "top_k": 2, "num_prompts": 4, "overrides": {}})
    assert (model.top_k, model.num_prompts) == section_routing({"preset": "tiny", "top_k": 2, "num_prompts": 4})
    config = load_config("demo", overrides=["model.num_prompts=6", "model.top_k=2"])
    assert model_k_n(config) == section_routing(config["model"]) == (2, 6)

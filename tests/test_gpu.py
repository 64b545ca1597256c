"""GPU checks (marker ``gpu``): the cuda and triton backends of every op on a CUDA device, and the fast step.

On a CUDA device: every op's ``cuda`` and ``triton`` backends against the reference on fresh random
inputs (odd shapes, strided views, duplicate experts), values and gradients, in float64, float32 and the
half types; ``torch.library.opcheck`` of every registered op on CUDA tensors; dispatch on CUDA; and
``fast_cpl_step`` with the fused kernels equal to ``literal_cpl_step`` with the reference ops, in float32
(TF32 off) and float64. Error rules: float64 tight; the half types by the budgets the CPU tests use
(``tests/test_prompt_mix.py``: ``|kernel - ref32| <= 2 |torch_lowprec - ref32| + atol`` per element;
``tests/test_cpr_distances.py``: twice torch's own error in that dtype plus one rounding, which is also
its float32 rule); prompt_mix in float32: twice torch's own float32 error plus 1e-5 of the scale.

Here a backend that cannot run is a failure, with its reasons: these tests are the GPU validation of
the build (``bash scripts/gpu_check.sh``). Without a CUDA device every test is skipped, saying so.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_cpr_distances import _check as check_cpr_distances
from test_fast_step import assert_same_step, make_batch, make_model
from test_prompt_mix import TOL, Case, make_inputs, run_with_grads

from cpl_fast import _extension
from cpl_fast.losses import CPRLoss, PerceptualFeatures
from cpl_fast.ops import prompt_mix, prompt_mix_reference
from cpl_fast.ops.cpr_distances import DISPATCHER as CPR_DISTANCES
from cpl_fast.ops.prompt_mix import DISPATCHER as PROMPT_MIX
from cpl_fast.train import MismatchedExperts, OtherTask, fast_cpl_step, literal_cpl_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU checks run on a GPU machine "
                                          "(bash scripts/gpu_check.sh)")]

CUDA = torch.device("cuda")
GPU_BACKENDS = ("cuda", "triton")


def require(dispatcher, backend: str) -> None:
    """Fail (not skip) when ``backend`` cannot run on the GPU: that is what this file checks."""
    reasons = dispatcher.backends[backend].available(CUDA)
    assert not reasons, f"{dispatcher.op}: the {backend} backend cannot run on CUDA: {'; '.join(reasons)}"


def test_extension_has_cuda_kernels():
    assert _extension.load_error() is None, _extension.load_error()
    config = _extension.build_config()
    for op in ("prompt_mix", "_prompt_mix_backward", "cpr_distances", "_cpr_distances_backward"):
        assert _extension.has_kernel(op, "CUDA"), (
            f"cpl_fast._C has no CUDA kernel of {op} (build: {config.get('cuda_reason', config)})")


# --- prompt_mix -------------------------------------------------------------------------------------

def random_cases(count: int, seed: int) -> list[Case]:
    """Fresh shapes: any bank size (1x1 up), k up to n, up- and down-sampling to odd output sizes."""
    gen = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    cases = []
    for i in range(count):
        n = draw(1, 7)
        cases.append(Case(f"random{i}", n, draw(1, 9), draw(1, 17), draw(1, 17), draw(1, 9), draw(1, n),
                          draw(1, 40), draw(1, 40)))
    return cases


# Few enough shapes to keep Triton's compilations (one per dtype and specialisation) to a minute or so.
PROMPT_CASES = random_cases(6, seed=2024) + [
    Case("cpl_prompt3_train", 5, 320, 16, 16, 8, 1, 16, 16),       # the cpl model's shapes
    Case("cpl_prompt1_infer", 5, 64, 64, 64, 2, 1, 256, 256),
    Case("contended_atomics", 2, 4, 5, 5, 96, 1, 33, 17),          # 96 samples on 2 experts
    Case("bank1x1_to_odd", 3, 2, 1, 1, 3, 2, 37, 41),
    Case("downsample_odd", 4, 3, 31, 29, 2, 2, 7, 5),
    Case("k_equals_n", 5, 3, 6, 6, 4, 5, 13, 11),
]


def _mix(backend: str):
    return lambda *args: prompt_mix(*args, backend=backend)


def _prompt_mix_results(backend: str, case: Case, dtype: torch.dtype, seed: int):
    """``(kernel, torch in dtype, float64 reference)`` results: each ``(out, grad_bank, grad_weights)``."""
    torch.manual_seed(seed)
    bank, indices, weights = make_inputs(case, dtype, CUDA.type)
    size = (case.H, case.W)
    grad_out = torch.randn(case.B, case.C, case.H, case.W, device=CUDA).to(dtype)
    kernel = run_with_grads(_mix(backend), bank, indices, weights, size, grad_out)
    low = run_with_grads(prompt_mix_reference, bank, indices, weights, size, grad_out)
    exact = run_with_grads(prompt_mix_reference, bank.double(), indices, weights.double(), size,
                           grad_out.double())
    return kernel, low, exact


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", PROMPT_CASES, ids=str)
def test_prompt_mix_float64(backend, case):
    require(PROMPT_MIX, backend)
    kernel, _, exact = _prompt_mix_results(backend, case, torch.float64, seed=1)
    for name, got, want in zip(("out", "grad_bank", "grad_weights"), kernel, exact):
        torch.testing.assert_close(got, want, **TOL[torch.float64], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", PROMPT_CASES, ids=str)
def test_prompt_mix_float32(backend, case):
    """Tensor-wide: the kernel's largest error at most twice torch's own float32 one plus 1e-5 of the scale.

    The 1e-5 (tests/test_prompt_mix.py's float32 rtol) leaves room for another summation order over
    millions of terms (grad_weights of the 256x256 case); a wrong index or weight is off by far more.
    """
    require(PROMPT_MIX, backend)
    kernel, low, exact = _prompt_mix_results(backend, case, torch.float32, seed=2)
    for name, got, lo, want in zip(("out", "grad_bank", "grad_weights"), kernel, low, exact):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        err = (got.double() - want).abs().max().item()
        budget = 2 * (lo.double() - want).abs().max().item() + 1e-5 * (1 + want.abs().max().item())
        assert err <= budget, f"{name}: error {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", PROMPT_CASES[:2] + PROMPT_CASES[-5:], ids=str)
def test_prompt_mix_low_precision_error_budget(backend, dtype, case):
    """tests/test_prompt_mix.py's rule, per element: |kernel - ref32| <= 2 |torch_lowprec - ref32| + atol."""
    require(PROMPT_MIX, backend)
    torch.manual_seed(3)
    bank, indices, weights = make_inputs(case, dtype, CUDA.type)
    size = (case.H, case.W)
    grad_out = torch.randn(case.B, case.C, case.H, case.W, device=CUDA).to(dtype)
    ref32 = run_with_grads(prompt_mix_reference, bank.float(), indices, weights.float(), size,
                           grad_out.float())
    torch_low = run_with_grads(prompt_mix_reference, bank, indices, weights, size, grad_out)
    kernel = run_with_grads(_mix(backend), bank, indices, weights, size, grad_out)
    for name, got, low, want in zip(("out", "grad_bank", "grad_weights"), kernel, torch_low, ref32):
        assert got.dtype == dtype
        atol = 1e-2 * max(1.0, want.abs().max().item())
        err = (got.float() - want).abs()
        budget = 2 * (low.float() - want).abs() + atol
        assert bool((err <= budget).all()), f"{name}: max excess {(err - budget).max().item():.3g}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_prompt_mix_strided_inputs_and_repeated_experts(backend):
    require(PROMPT_MIX, backend)
    big_bank = torch.randn(6, 5, 7, 12, dtype=torch.float64, device=CUDA)
    bank = big_bank[1:, ::2, :, 1::2]                                   # (5, 3, 7, 6), strided
    indices = torch.tensor([[1, 1, 4, 0], [2, 2, 2, 3]], device=CUDA).t()   # (4, 2), repeats within a sample
    weights = torch.randn(2, 4, dtype=torch.float64, device=CUDA).t()
    grad_out = torch.randn(4, 3, 9, 10, dtype=torch.float64, device=CUDA)[..., ::2]
    assert not (bank.is_contiguous() or indices.is_contiguous() or weights.is_contiguous()
                or grad_out.is_contiguous())
    expected = run_with_grads(prompt_mix_reference, bank, indices, weights, (9, 5), grad_out)
    actual = run_with_grads(_mix(backend), bank, indices, weights, (9, 5), grad_out)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def _opcheck_prompt_mix_args(dtype: torch.dtype):
    bank = torch.randn(3, 2, 3, 4, dtype=dtype, device=CUDA, requires_grad=True)
    indices = torch.tensor([[0, 2], [1, 0]], device=CUDA)
    weights = torch.randn(2, 2, dtype=dtype, device=CUDA, requires_grad=True)
    grad_out = torch.randn(2, 2, 5, 7, dtype=dtype, device=CUDA)
    return bank, indices, weights, grad_out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_prompt_mix_opcheck(backend, dtype):
    require(PROMPT_MIX, backend)
    if backend == "triton":
        import cpl_fast.kernels.prompt_mix  # noqa: F401  (registers the triton ops)
    ops = torch.ops.cpl_fast
    forward, backward = ((ops.prompt_mix, ops._prompt_mix_backward) if backend == "cuda"
                         else (ops.prompt_mix_triton, ops._prompt_mix_triton_backward))
    bank, indices, weights, grad_out = _opcheck_prompt_mix_args(dtype)
    torch.library.opcheck(forward.default, (bank, indices, weights, 5, 7))
    torch.library.opcheck(backward.default, (grad_out, bank.detach(), indices, weights.detach()))


def test_cuda_kernel_stops_on_an_index_out_of_range():
    """The CUDA kernels trap on a bad index (no host check, which would synchronise): in a child process,
    since a trapped kernel leaves the CUDA context unusable."""
    require(PROMPT_MIX, "cuda")
    code = ("import torch; from cpl_fast.ops import prompt_mix; d = 'cuda'; "
            "out = prompt_mix(torch.randn(3, 2, 4, 4, device=d), torch.tensor([[0, 3]], device=d), "
            "torch.ones(1, 2, device=d), (5, 5), backend='cuda'); torch.cuda.synchronize(); "
            "print('no error')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and "no error" not in result.stdout, result.stdout + result.stderr[-2000:]


def test_prompt_mix_dispatch_on_cuda():
    require(PROMPT_MIX, "cuda")
    bank, indices, weights, _ = _opcheck_prompt_mix_args(torch.float32)
    assert PROMPT_MIX.select(bank, indices, weights, (5, 7), device=CUDA).name == "cuda"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:  # both GPU backwards use atomics, so deterministic mode falls back to the reference
        assert PROMPT_MIX.select(bank, indices, weights, (5, 7), device=CUDA).name == "reference"
    finally:
        torch.use_deterministic_algorithms(previous)


# --- cpr_distances ----------------------------------------------------------------------------------

def random_cpr_cases(count: int, seed: int) -> list[tuple]:
    """Fresh ``(batch, m, trailing)``: up to 9 negatives, 1 to ~20000 elements per sample (ragged chunks)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    return [(draw(1, 5), draw(1, 9), tuple(draw(1, 30) for _ in range(draw(1, 3)))) for _ in range(count)]


CPR_CASES = random_cpr_cases(4, seed=7) + [
    (2, 4, (64, 64, 64)), (3, 5, (9000,)), (1, 1, (1,)), (4, 9, (2, 1, 3))]
CPR_IDS = [f"B{b}-m{m}-{'x'.join(map(str, t))}" for b, m, t in CPR_CASES]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("layout", ["views", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CPR_CASES, ids=CPR_IDS)
def test_cpr_distances(backend, dtype, layout, weighted, case):
    """Values and gradients against the float64 oracle, by tests/test_cpr_distances.py's own check."""
    require(CPR_DISTANCES, backend)
    batch, m, trailing = case
    check_cpr_distances(backend, CUDA.type, dtype, batch, m, trailing, layout, weighted, seed=batch * 100 + m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CPR_CASES, ids=CPR_IDS)
def test_cpr_distances_low_precision_error_budget(backend, dtype, case):
    """tests/test_cpr_distances.py's budget: twice torch's own error in that dtype, plus one rounding."""
    require(CPR_DISTANCES, backend)
    batch, m, trailing = case
    check_cpr_distances(backend, CUDA.type, dtype, batch, m, trailing, "views", True,
                        seed=batch * 100 + m + 1)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cpr_distances_opcheck(backend, weighted):
    require(CPR_DISTANCES, backend)
    if backend == "triton":
        import cpl_fast.kernels.cpr_distances  # noqa: F401  (registers the triton ops)
    ops = torch.ops.cpl_fast
    forward, backward = ((ops.cpr_distances, ops._cpr_distances_backward) if backend == "cuda"
                         else (ops.cpr_distances_triton, ops._cpr_distances_backward_triton))
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64).to(CUDA).requires_grad_(True)
    f_gt = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64).to(CUDA)
    weights = torch.rand(2, 2, generator=gen, dtype=torch.float64).to(CUDA) if weighted else None
    f_pos, f_neg = feats[:2], feats[2:].view(2, 2, 2, 3)
    torch.library.opcheck(forward.default, (f_pos, f_gt, f_neg, weights))
    grads = [torch.randn(2, dtype=torch.float64, device=CUDA) for _ in range(2)]
    torch.library.opcheck(backward.default, (*grads, f_pos.detach(), f_gt, f_neg.detach(), weights))


def test_cpr_distances_dispatch_on_cuda():
    require(CPR_DISTANCES, "cuda")
    f = torch.zeros(2, 3, device=CUDA)
    assert CPR_DISTANCES.select(f, f, f.expand(2, 2, 3), None, device=CUDA).name == "cuda"


# --- the fast step --------------------------------------------------------------------------------

@pytest.fixture
def no_tf32():
    """TF32 off: the fast and literal steps run different batch shapes, whose TF32 roundings (~1e-3)
    would swamp the float32 comparison."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# float32 takes the difference form: these small random models' negatives are so close to the positive
# (L_neg ~1e-6 to 1e-10) that the ratio form, and L_neg itself with other_task at k = 2, lose four digits to
# cancellation in float32 whatever the backend (reference against reference included); float64 takes those.
STEP_CASES = [  # model, dtype, form, sampler, m, k, weighted, neg_chunk
    ("tiny", torch.float32, "difference", "mismatched_experts", 4, 1, False, None),
    ("nafnet_tiny", torch.float32, "difference", "mismatched_experts", 2, 1, True, 1),
    ("nafnet_tiny", torch.float32, "difference", "mismatched_experts", 4, 2, True, 3),
    ("tiny", torch.float64, "ratio", "other_task", 2, 2, True, 1),
    ("nafnet_tiny", torch.float64, "ratio", "mismatched_experts", 3, 1, False, None),
]


@pytest.mark.parametrize("fast_backend", GPU_BACKENDS)
@pytest.mark.parametrize("name,dtype,form,sampler_name,m,k,weighted,neg_chunk", STEP_CASES)
def test_fast_step_equals_literal_on_cuda(no_tf32, monkeypatch, fast_backend, name, dtype, form, sampler_name,
                                          m, k, weighted, neg_chunk):
    """fast_cpl_step on the fused kernels = literal_cpl_step on the reference ops (loss, routing, grads)."""
    require(PROMPT_MIX, fast_backend)
    require(CPR_DISTANCES, fast_backend)
    model = make_model(name, k, dtype).to(CUDA)
    features = PerceptualFeatures.random_vgg19(seed=0, layers=("relu1_1", "relu2_1")).to(CUDA, dtype)
    size = 3
    tasks = [0, 1, 2] if sampler_name == "other_task" else None
    batch = tuple(t.to(CUDA) for t in make_batch(size, dtype, tasks))
    make_sampler = (lambda: MismatchedExperts(model.num_prompts)) if tasks is None else (lambda: OtherTask(3))
    g = torch.Generator().manual_seed(5)
    neg_weights = None
    if weighted:
        neg_weights = torch.rand(size, m, generator=g, dtype=torch.float64).to(CUDA, dtype) + 0.5
    loss = CPRLoss(alpha=0.5, form=form)
    monkeypatch.setenv("CPL_FAST_BACKEND", "reference")
    literal = literal_cpl_step(model, batch, features, loss, make_sampler(), m=m, neg_weights=neg_weights,
                               generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("CPL_FAST_BACKEND", fast_backend)
    fast = fast_cpl_step(model, batch, features, loss, make_sampler(), m=m, neg_weights=neg_weights,
                         generator=torch.Generator().manual_seed(3), neg_chunk=neg_chunk)
    # Both steps' backward passes run under the fast backend's ops (autograd kept each forward's choice).
    assert_same_step(fast, literal, model, 1e-10 if dtype == torch.float64 else 1e-4)

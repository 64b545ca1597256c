"""cpl_fast.ops.prompt_mix: every backend against the reference, gradients, registration, dispatch.

The Triton kernels run on a CUDA device when there is one; on the CPU they run under
``TRITON_INTERPRET=1``, which must be set before triton is imported, so
``test_interpreted_kernels_in_subprocess`` re-runs this file's Triton cases in a child process with
it set (the Triton cases of this process skip).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cpl_fast.ops
from cpl_fast import _extension
from cpl_fast.ops import prompt_mix, prompt_mix_reference
from cpl_fast.ops.prompt_mix import DISPATCHER

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-5)}


@dataclass(frozen=True)
class Case:
    """bank (n, C, S, Sp), indices (B, k), output (H, W)."""
    name: str
    n: int
    C: int
    S: int
    Sp: int
    B: int
    k: int
    H: int
    W: int

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("upsample", 5, 3, 4, 4, 3, 2, 9, 7),
    Case("downsample", 4, 2, 12, 10, 3, 2, 5, 3),
    Case("identity_k1", 5, 3, 6, 6, 4, 1, 6, 6),
    Case("bank1x1", 3, 2, 1, 1, 2, 2, 4, 5),
    Case("out_h1", 4, 2, 7, 5, 3, 2, 1, 6),
    Case("nonsquare_k_eq_n", 3, 2, 5, 9, 4, 3, 8, 4),
    Case("mixed_up_down", 5, 2, 3, 8, 2, 5, 7, 1),
    Case("dup_across_batch", 2, 3, 5, 5, 7, 1, 6, 3),
]


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu"):
    """Random bank and weights, distinct experts per sample (as top-k gives), shared across samples."""
    bank = torch.randn(case.n, case.C, case.S, case.Sp, dtype=dtype, device=device)
    indices = torch.stack([torch.randperm(case.n)[:case.k] for _ in range(case.B)]).to(device)
    weights = (torch.rand(case.B, case.k, dtype=dtype, device=device) + 0.5) * torch.where(
        torch.rand(case.B, case.k, device=device) < 0.3, -1.0, 1.0).to(dtype)
    return bank, indices, weights


def run_with_grads(fn, bank, indices, weights, size, grad_out):
    bank = bank.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    out = fn(bank, indices, weights, size)
    out.backward(grad_out)
    return out.detach(), bank.grad, weights.grad


def backend_or_skip(name: str, device: str) -> None:
    """Skip with the backend's own reasons when it cannot run on ``device`` in this process."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if name == "triton" and device == "cpu" and not INTERPRETED:
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1: covered by test_interpreted_kernels_in_subprocess")
    reasons = DISPATCHER.backends[name].available(torch.device(device))
    if reasons:
        pytest.skip(f"{name} backend unavailable: {'; '.join(reasons)}")


# (backend, device) pairs: the Triton kernels on the GPU when there is one, else interpreted on the CPU.
BACKENDS = [("cpu", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu"), ("cuda", "cuda")]
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, device, dtype, case):
    backend_or_skip(backend, device)
    bank, indices, weights = make_inputs(case, dtype, device)
    size = (case.H, case.W)
    grad_out = torch.randn(case.B, case.C, case.H, case.W, dtype=dtype, device=device)
    expected = run_with_grads(prompt_mix_reference, bank, indices, weights, size, grad_out)
    actual = run_with_grads(lambda *a: prompt_mix(*a, backend=backend), bank, indices, weights, size, grad_out)
    for name, got, want in zip(("out", "grad_bank", "grad_weights"), actual, expected):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_non_contiguous_inputs(backend, device):
    backend_or_skip(backend, device)
    dtype = torch.float64
    big_bank = torch.randn(6, 5, 7, 12, dtype=dtype, device=device)
    bank = big_bank[1:, ::2, :, 1::2]                               # a strided slice (5, 3, 7, 6)
    indices = torch.randint(0, 5, (2, 4), device=device).t()        # (4, 2) transposed view
    weights = torch.randn(2, 4, dtype=dtype, device=device).t()     # (4, 2) transposed view
    grad_out = torch.randn(4, 3, 9, 10, dtype=dtype, device=device)[..., ::2]   # (4, 3, 9, 5)
    assert not (bank.is_contiguous() or indices.is_contiguous() or weights.is_contiguous()
                or grad_out.is_contiguous())
    size = (9, 5)
    expected = run_with_grads(prompt_mix_reference, bank, indices, weights, size, grad_out)
    actual = run_with_grads(lambda *a: prompt_mix(*a, backend=backend), bank, indices, weights, size, grad_out)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_repeated_expert_within_a_sample(backend, device):
    """Top-k never repeats an expert, but the op's maths holds when a caller does."""
    backend_or_skip(backend, device)
    bank = torch.randn(3, 2, 4, 5, dtype=torch.float64, device=device)
    indices = torch.tensor([[1, 1], [2, 0], [1, 2]], device=device)
    weights = torch.randn(3, 2, dtype=torch.float64, device=device)
    grad_out = torch.randn(3, 2, 6, 3, dtype=torch.float64, device=device)
    expected = run_with_grads(prompt_mix_reference, bank, indices, weights, (6, 3), grad_out)
    actual = run_with_grads(lambda *a: prompt_mix(*a, backend=backend), bank, indices, weights, (6, 3), grad_out)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


LOW_PRECISION = [("cpu", "cpu", torch.bfloat16)] + [
    (b, "cuda", dt) for b in ("triton", "cuda") for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("backend,device,dtype", LOW_PRECISION, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[5]], ids=str)
def test_low_precision_error_budget(backend, device, dtype, case):
    """|kernel - ref_fp32| <= 2 |torch_lowprec - ref_fp32| + atol, for the output and both gradients."""
    backend_or_skip(backend, device)
    bank, indices, weights = make_inputs(case, dtype, device)
    size = (case.H, case.W)
    grad_out = torch.randn(case.B, case.C, case.H, case.W, device=device).to(dtype)
    ref32 = run_with_grads(prompt_mix_reference, bank.float(), indices, weights.float(), size, grad_out.float())
    torch_low = run_with_grads(prompt_mix_reference, bank, indices, weights, size, grad_out)
    kernel = run_with_grads(lambda *a: prompt_mix(*a, backend=backend), bank, indices, weights, size, grad_out)
    for name, got, low, want in zip(("out", "grad_bank", "grad_weights"), kernel, torch_low, ref32):
        assert got.dtype == dtype
        atol = 1e-2 * max(1.0, want.abs().max().item())
        err = (got.float() - want).abs()
        budget = 2 * (low.float() - want).abs() + atol
        assert bool((err <= budget).all()), f"{name}: max excess {(err - budget).max().item():.3g}"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend):
    if backend != "reference":
        backend_or_skip(backend, "cpu")
    bank = torch.randn(4, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 2], [3, 0], [2, 1]])
    weights = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    for size in [(5, 7), (2, 3)]:
        assert torch.autograd.gradcheck(lambda b, w: prompt_mix(b, indices, w, size, backend=backend),
                                        (bank, weights))


def _cpu_op_or_skip() -> None:
    backend_or_skip("cpu", "cpu")


def test_opcheck_registered_op():
    _cpu_op_or_skip()
    bank = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 2], [1, 0]])
    weights = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.cpl_fast.prompt_mix.default, (bank, indices, weights, 6, 3))
    grad_out = torch.randn(2, 2, 6, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.cpl_fast._prompt_mix_backward.default,
                          (grad_out, bank.detach(), indices, weights.detach()))


def test_torch_compile_fullgraph_matches_eager():
    _cpu_op_or_skip()

    class PromptStage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bank = torch.nn.Parameter(torch.randn(4, 3, 5, 5))

        def forward(self, indices, weights):
            return prompt_mix(self.bank, indices, weights, (8, 6), backend="cpu").square().mean()

    module = PromptStage()
    indices = torch.tensor([[0, 3], [2, 0]])
    weights = torch.rand(2, 2, requires_grad=True)
    loss = module(indices, weights)
    grads = torch.autograd.grad(loss, (module.bank, weights))
    compiled = torch.compile(module, fullgraph=True)
    loss_c = compiled(indices, weights)
    grads_c = torch.autograd.grad(loss_c, (module.bank, weights))
    torch.testing.assert_close(loss_c, loss)
    for got, want in zip(grads_c, grads):
        torch.testing.assert_close(got, want)


def test_cpu_backward_is_deterministic():
    _cpu_op_or_skip()
    torch.set_num_threads(max(2, torch.get_num_threads()))
    bank = torch.randn(5, 16, 9, 11)
    indices = torch.randint(0, 5, (12, 2))      # many samples share each expert
    weights = torch.randn(12, 2)
    grad_out = torch.randn(12, 16, 20, 13)
    first = torch.ops.cpl_fast._prompt_mix_backward(grad_out, bank, indices, weights)
    for _ in range(3):
        again = torch.ops.cpl_fast._prompt_mix_backward(grad_out, bank, indices, weights)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_compiled_op_checks_index_range():
    _cpu_op_or_skip()
    bank = torch.randn(3, 2, 4, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.cpl_fast.prompt_mix(bank, torch.tensor([[0, 3]]), torch.ones(1, 2), 4, 4)


# --- dispatch --------------------------------------------------------------------------------------

def _small_inputs(dtype=torch.float32):
    return torch.randn(3, 2, 4, 4, dtype=dtype), torch.tensor([[0, 2], [1, 0]]), torch.rand(2, 2, dtype=dtype)


def test_auto_picks_cpu_backend_on_cpu():
    _cpu_op_or_skip()
    bank, indices, weights = _small_inputs()
    assert DISPATCHER.select(bank, indices, weights, (5, 5), device=bank.device).name == "cpu"
    weights.requires_grad_(True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:  # the cpu backward has no atomics, so deterministic mode keeps it
        assert DISPATCHER.select(bank, indices, weights, (5, 5), device=bank.device).name == "cpu"
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_forcing_the_reference_backend(how, monkeypatch):
    bank, indices, weights = _small_inputs(torch.float64)
    called = []
    original = DISPATCHER.backends["reference"]
    spy = type(original)("reference", lambda *a: called.append(1) or original.fn(*a), original.available)
    monkeypatch.setitem(DISPATCHER.backends, "reference", spy)
    if how == "environment":
        monkeypatch.setenv("CPL_FAST_BACKEND", "reference")
        out = prompt_mix(bank, indices, weights, (6, 3))
    else:
        monkeypatch.setenv("CPL_FAST_BACKEND", "cpu")      # the argument wins over the variable
        out = prompt_mix(bank, indices, weights, (6, 3), backend="reference")
    assert called == [1]
    torch.testing.assert_close(out, prompt_mix_reference(bank, indices, weights, (6, 3)), rtol=0, atol=0)


def test_forced_unavailable_backend_raises_with_reasons(monkeypatch):
    bank, indices, weights = _small_inputs()
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this call: .*runs on cuda tensors, not cpu"):
        prompt_mix(bank, indices, weights, (4, 4), backend="cuda")
    if not INTERPRETED:
        monkeypatch.setenv("CPL_FAST_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            prompt_mix(bank, indices, weights, (4, 4))
    if _extension.load_error() is None:
        half = [t.half() if t.is_floating_point() else t for t in (bank, indices, weights)]
        with pytest.raises(RuntimeError, match="the cpu backend takes float32, float64, bfloat16, not float16"):
            prompt_mix(*half, (4, 4), backend="cpu")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        prompt_mix(*_small_inputs(), (4, 4), backend="fast")


def test_auto_falls_back_to_reference_for_float16_and_says_so(caplog):
    _cpu_op_or_skip()
    bank, indices, weights = (t.half() if t.is_floating_point() else t for t in _small_inputs())
    DISPATCHER._announced.discard(("reference", "cpu"))
    with caplog.at_level(logging.WARNING, logger="cpl_fast"):
        out = prompt_mix(bank, indices, weights, (5, 3))
    assert "uses the 'reference' backend" in caplog.text and "float16" in caplog.text
    torch.testing.assert_close(out, prompt_mix_reference(bank, indices, weights, (5, 3)))


def test_available_backends_reports_prompt_mix():
    report = cpl_fast.ops.available_backends("cpu")["prompt_mix"]
    assert report["reference"] == []
    assert report["cuda"]                                   # never on a CPU tensor
    assert (report["cpu"] == []) == (_extension.load_error() is None)


# --- bad inputs ------------------------------------------------------------------------------------

def _bad(**change):
    args = dict(bank=torch.randn(3, 2, 4, 4), indices=torch.tensor([[0, 2], [1, 0]]), weights=torch.rand(2, 2),
                size=(5, 5))
    args.update(change)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(bank=torch.randn(3, 2, 4)), ValueError, "bank must be 4-D"),
    (_bad(bank=torch.randint(0, 3, (3, 2, 4, 4))), ValueError, "floating-point"),
    (_bad(indices=torch.tensor([0, 1])), ValueError, r"indices must be a \(B, k\) int64"),
    (_bad(indices=torch.tensor([[0, 2], [1, 0]], dtype=torch.int32)), ValueError, "int64"),
    (_bad(weights=torch.rand(2, 3)), ValueError, "weights shape"),
    (_bad(weights=torch.rand(2, 2, dtype=torch.float64)), ValueError, "weights dtype"),
    (_bad(indices=torch.tensor([[0, 3], [1, 0]])), ValueError, r"index 3 out of range \[0, 3\)"),
    (_bad(indices=torch.tensor([[0, -1], [1, 0]])), ValueError, r"index -1 out of range"),
    (_bad(size=(0, 5)), ValueError, "size must be positive"),
    (_bad(size=(5,)), ValueError, r"size must be \(H, W\)"),
    (_bad(size=(5.0, 5)), TypeError, "size must be two ints"),
    (_bad(indices=torch.zeros(2, 4, dtype=torch.long), weights=torch.rand(2, 4)), ValueError,
     "k = 4 experts per sample but the bank has only n = 3"),
    (_bad(indices=torch.zeros(2, 0, dtype=torch.long), weights=torch.rand(2, 0)), ValueError, "k >= 1"),
    (_bad(bank=torch.randn(3, 2, 0, 4)), ValueError, "spatial size"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        prompt_mix(args["bank"], args["indices"], args["weights"], args["size"])


# --- Triton --------------------------------------------------------------------------------------

def test_triton_opcheck():
    device = "cuda" if HAS_CUDA else "cpu"
    backend_or_skip("triton", device)
    bank = torch.randn(3, 2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    indices = torch.tensor([[0, 2], [1, 0]], device=device)
    weights = torch.randn(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    # Under TRITON_INTERPRET=1, torch's wrap_triton hands the interpreted kernel back untraced, so it
    # would run on fake tensors: the fake-tensor and AOT-dispatch checks need a real GPU kernel.
    utils = ("test_schema", "test_autograd_registration") if device == "cpu" else None
    torch.library.opcheck(torch.ops.cpl_fast.prompt_mix_triton.default, (bank, indices, weights, 5, 2),
                          test_utils=utils or torch.library._OPCHECK_DEFAULT_UTILS)
    grad_out = torch.randn(2, 2, 5, 2, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.cpl_fast._prompt_mix_triton_backward.default,
                          (grad_out, bank.detach(), indices, weights.detach()),
                          test_utils=utils or torch.library._OPCHECK_DEFAULT_UTILS)


def test_triton_kernels_compile_for_sm90():
    """The Triton kernels lower to a Hopper cubin (no GPU needed: Triton ships ptxas)."""
    if INTERPRETED:
        pytest.skip("compiles for the GPU: runs in the parent process, not under TRITON_INTERPRET=1")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {exc}")
    from cpl_fast.kernels import prompt_mix as kernels

    for kernel in (kernels._prompt_mix_fwd_kernel, kernels._prompt_mix_bwd_kernel):
        signature, constexprs = {}, {}
        for position, name in enumerate(kernel.arg_names):
            if name in ("USE_FP64", "BLOCK"):
                signature[name] = "constexpr"
                constexprs[(position,)] = False if name == "USE_FP64" else 256
            elif name.endswith("_ptr"):
                signature[name] = {"idx_ptr": "*i64", "gbank_ptr": "*fp32", "partial_ptr": "*fp32"}.get(name, "*bf16")
            elif name in ("S", "K"):                      # Triton specialises arguments equal to 1
                signature[name] = "constexpr"
                constexprs[(position,)] = 1
            else:
                signature[name] = "i64"
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"]


def test_interpreted_kernels_in_subprocess():
    """Re-run this file's Triton cases with TRITON_INTERPRET=1 (it must be set before triton loads)."""
    if INTERPRETED:
        pytest.skip("already under TRITON_INTERPRET=1: the Triton cases run in this process")
    if HAS_CUDA:
        pytest.skip("the Triton cases run on the CUDA device in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-k", "triton",
         str(Path(__file__))],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary, summary


def test_reference_matches_interpolate_of_the_mix():
    """The oracle itself: with one-hot weights it is F.interpolate of the chosen expert."""
    bank = torch.randn(4, 2, 5, 3, dtype=torch.float64)
    indices = torch.tensor([[2], [0]])
    out = prompt_mix_reference(bank, indices, torch.ones(2, 1, dtype=torch.float64), (7, 4))
    expected = F.interpolate(bank[[2, 0]], size=(7, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

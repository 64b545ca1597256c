"""cpl_fast.ops.prompt_mix: the shared op tests (tests/op_harness.py) and the op's own.

The Triton kernels run on a CUDA device when there is one; on the CPU they run under
``TRITON_INTERPRET=1``, which must be set before triton is imported, so
``test_interpreted_kernels_in_subprocess`` re-runs this file's Triton cases in a child process with
it set (the Triton cases of this process skip).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from op_harness import INTERPRETED, TOL, Inputs, KernelOpTester, backend_or_skip

from cpl_fast.ops import prompt_mix, prompt_mix_reference
from cpl_fast.ops.prompt_mix import DISPATCHER

__all__ = ["TOL", "Case", "make_inputs", "run_with_grads"]    # tests/test_gpu.py reuses them


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


def _non_contiguous(dtype, device):
    """A strided slice of a bank, transposed indices and weights, a strided upstream gradient."""
    indices = torch.randint(0, 5, (2, 4), device=device).t()        # (4, 2) transposed view
    grad_out = torch.randn(4, 3, 9, 10, dtype=torch.float64, device=device)[..., ::2]   # (4, 3, 9, 5)
    return Inputs([torch.randn(6, 5, 7, 12, dtype=dtype, device=device),
                   torch.randn(2, 4, dtype=dtype, device=device)],
                  lambda big, w: (big[1:, ::2, :, 1::2], indices, w.t(), (9, 5)), [grad_out])


def _repeated_expert(dtype, device):
    """Top-k never repeats an expert, but the op's maths holds when a caller does."""
    indices = torch.tensor([[1, 1], [2, 0], [1, 2]], device=device)
    return Inputs([torch.randn(3, 2, 4, 5, dtype=dtype, device=device),
                   torch.randn(3, 2, dtype=dtype, device=device)],
                  lambda b, w: (b, indices, w, (6, 3)),
                  [torch.randn(3, 2, 6, 3, dtype=torch.float64, device=device)])


def _gradcheck(size):
    def make(dtype, device):
        indices = torch.tensor([[0, 2], [3, 0], [2, 1]], device=device)
        return Inputs([torch.randn(4, 2, 3, 4, dtype=dtype, device=device),
                       torch.randn(3, 2, dtype=dtype, device=device)],
                      lambda b, w: (b, indices, w, size), [torch.randn(3, 2, *size, dtype=torch.float64)])
    return make


def _bad(**change):
    args = dict(bank=torch.randn(3, 2, 4, 4), indices=torch.tensor([[0, 2], [1, 0]]),
                weights=torch.rand(2, 2), size=(5, 5))
    args.update(change)
    return (args["bank"], args["indices"], args["weights"], args["size"]), {}


class TestPromptMix(KernelOpTester):
    fn = prompt_mix
    reference = prompt_mix_reference
    dispatcher = DISPATCHER
    output_names = ("out",)
    cases = {str(case): case for case in CASES}
    low_precision_cases = ("upsample", "downsample", "identity_k1", "nonsquare_k_eq_n")
    non_contiguous_cases = {"strided": _non_contiguous}
    gradcheck_cases = {"up_5x7": _gradcheck((5, 7)), "down_2x3": _gradcheck((2, 3))}
    dispatch_case = Case("dispatch", 3, 2, 4, 4, 2, 2, 5, 5)
    opcheck_variants = {"": None}

    def reference_cases(self):
        return super().reference_cases() + [("repeated_expert", _repeated_expert, torch.float64)]

    def make_inputs(self, case, dtype, device):
        if callable(case):
            return case(dtype, device)
        bank, indices, weights = make_inputs(case, dtype, device)
        grad_out = torch.randn(case.B, case.C, case.H, case.W, dtype=torch.float64, device=device)
        return Inputs([bank, weights], lambda b, w: (b, indices, w, (case.H, case.W)), [grad_out])

    def names(self, inputs):
        return ["out", "grad_bank", "grad_weights"]

    def opcheck_calls(self, backend, device, variant):
        bank = torch.randn(3, 2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
        indices = torch.tensor([[0, 2], [1, 0]], device=device)
        weights = torch.randn(2, 2, dtype=torch.float64, device=device, requires_grad=True)
        grad_out = torch.randn(2, 2, 6, 3, dtype=torch.float64, device=device)
        ops = torch.ops.cpl_fast
        forward, backward = ((ops.prompt_mix_triton, ops._prompt_mix_triton_backward) if backend == "triton"
                             else (ops.prompt_mix, ops._prompt_mix_backward))
        return [(forward.default, (bank, indices, weights, 6, 3)),
                (backward.default, (grad_out, bank.detach(), indices, weights.detach()))]

    def bad_inputs(self):
        return {
            "bank_3d": (*_bad(bank=torch.randn(3, 2, 4)), ValueError, "bank must be 4-D"),
            "bank_int": (*_bad(bank=torch.randint(0, 3, (3, 2, 4, 4))), ValueError, "floating-point"),
            "indices_1d": (*_bad(indices=torch.tensor([0, 1])), ValueError,
                           r"indices must be a \(B, k\) int64"),
            "indices_int32": (*_bad(indices=torch.tensor([[0, 2], [1, 0]], dtype=torch.int32)), ValueError,
                              "int64"),
            "weights_shape": (*_bad(weights=torch.rand(2, 3)), ValueError, "weights shape"),
            "weights_dtype": (*_bad(weights=torch.rand(2, 2, dtype=torch.float64)), ValueError,
                              "weights dtype"),
            "index_high": (*_bad(indices=torch.tensor([[0, 3], [1, 0]])), ValueError,
                           r"index 3 out of range \[0, 3\)"),
            "index_negative": (*_bad(indices=torch.tensor([[0, -1], [1, 0]])), ValueError,
                               r"index -1 out of range"),
            "size_zero": (*_bad(size=(0, 5)), ValueError, "size must be positive"),
            "size_1d": (*_bad(size=(5,)), ValueError, r"size must be \(H, W\)"),
            "size_float": (*_bad(size=(5.0, 5)), TypeError, "size must be two ints"),
            "k_above_n": (*_bad(indices=torch.zeros(2, 4, dtype=torch.long), weights=torch.rand(2, 4)),
                          ValueError, "k = 4 experts per sample but the bank has only n = 3"),
            "k_zero": (*_bad(indices=torch.zeros(2, 0, dtype=torch.long), weights=torch.rand(2, 0)),
                       ValueError, "k >= 1"),
            "bank_empty": (*_bad(bank=torch.randn(3, 2, 0, 4)), ValueError, "spatial size"),
        }


def _cpu_op_or_skip() -> None:
    backend_or_skip(DISPATCHER, "cpu", "cpu")


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


# --- Triton --------------------------------------------------------------------------------------

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


def test_reference_matches_interpolate_of_the_mix():
    """The oracle itself: with one-hot weights it is F.interpolate of the chosen expert."""
    bank = torch.randn(4, 2, 5, 3, dtype=torch.float64)
    indices = torch.tensor([[2], [0]])
    out = prompt_mix_reference(bank, indices, torch.ones(2, 1, dtype=torch.float64), (7, 4))
    expected = F.interpolate(bank[[2, 0]], size=(7, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_routing_matrix_sums_duplicates_like_scatter_add():
    """The compare-and-sum routing matrix is scatter_add's: repeated experts add their weights."""
    from cpl_fast.ops._reference import routing_matrix

    gen = torch.Generator().manual_seed(7)
    indices = torch.randint(0, 5, (6, 4), generator=gen)
    indices[0] = torch.tensor([3, 3, 1, 3])                       # a duplicate for sure
    weights = torch.rand(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = torch.zeros(6, 5, dtype=torch.float64).scatter_add(1, indices, weights)
    out = routing_matrix(indices, weights, 5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert out[0, 3] == weights[0, [0, 1, 3]].sum()
    assert torch.autograd.gradcheck(lambda w: routing_matrix(indices, w, 5), (weights,))

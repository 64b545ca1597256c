"""cpl_fast.ops.cpr_distances: the shared op tests (tests/op_harness.py) and the op's own.

The Triton kernels run on CUDA devices, or on the CPU under ``TRITON_INTERPRET=1``; the variable must be set
before triton is imported, so ``test_interpreted_kernels_in_subprocess`` re-runs this file's Triton tests in a
child process with it set, leaving the rest of the suite unaffected.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from op_harness import PAIRS, Inputs, KernelOpTester, backend_or_skip, param, run

from cpl_fast import _extension
from cpl_fast.ops import cpr_distances, cpr_distances_reference
from cpl_fast.ops.cpr_distances import DISPATCHER

needs_ext = pytest.mark.skipif(_extension.load_error() is not None, reason=f"{_extension.load_error()}")


def _case(batch: int, m: int, trailing: tuple[int, ...], dtype: torch.dtype, device: str, layout: str,
          weighted: bool, seed: int):
    """Fresh random leaves and a function mapping them to ``(f_pos, f_gt, f_neg, neg_weights)``.

    ``views``: f_pos and f_neg are views of one ``(1 + m) B`` feature tensor, as after one feature pass.
    ``strided``: separate tensors with batch strides (f_neg) or non-dense samples (f_pos, f_gt).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    weights = torch.rand(batch, m, generator=gen, dtype=torch.float64).add(0.5).to(device)
    weights = weights if weighted else None
    if layout == "views":
        leaves = [rand((1 + m) * batch, *trailing), rand(batch, *trailing)]

        def build(feats, gt):
            return feats[:batch], gt, feats[batch:].view(m, batch, *trailing), weights
    else:
        leaves = [rand(batch, *trailing[:-1], 2 * trailing[-1]), rand(*trailing, batch),
                  rand(batch, m, *trailing)]

        def build(pos, gt, neg):
            return pos[..., ::2], gt.movedim(-1, 0), neg.transpose(0, 1), weights
    return leaves, build


def _run(fn, leaves, build, upstream):
    """Outputs and the leaves' gradients for the given upstream gradients ``(g_pos, g_neg)``."""
    leaves = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    outputs = fn(*build(*leaves))
    grads = torch.autograd.grad(outputs, leaves, upstream)
    return [o.detach() for o in outputs], list(grads)


def _inputs(batch: int, m: int, trailing, dtype: torch.dtype, device: str, layout: str, weighted: bool,
            seed: int) -> Inputs:
    leaves, build = _case(batch, m, trailing, dtype, device, layout, weighted, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(batch, generator=gen, dtype=torch.float64).to(device) for _ in range(2)]
    return Inputs(leaves, build, upstream)


def _check(backend: str, device: str, dtype: torch.dtype, batch: int, m: int, trailing, layout: str,
           weighted: bool, seed: int) -> None:
    """The backend's values and gradients against the float64 oracle (TestCprDistances.compare)."""
    TestCprDistances().check(backend, device, dtype, (batch, m, trailing, layout, weighted, seed))


def _gradcheck(weighted: bool):
    def make(dtype, device):
        gen = torch.Generator().manual_seed(3)
        leaves = [torch.randn(*s, generator=gen, dtype=dtype).to(device)
                  for s in ((2, 3, 4), (2, 3, 4), (3, 2, 3, 4))]
        weights = torch.rand(2, 3, generator=gen, dtype=dtype).to(device) if weighted else None
        return Inputs(leaves, lambda p, g, n: (p, g, n, weights), [])
    return make


def _opcheck_args(device: str, weighted: bool):
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    f_gt = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64).to(device)
    weights = torch.rand(2, 2, generator=gen, dtype=torch.float64).to(device) if weighted else None
    return feats[:2], f_gt, feats[2:].view(2, 2, 2, 3), weights


def _bad_calls() -> dict:
    pos, gt, neg = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(4, 2, 3, 4)
    return {
        "gt_shape": ((pos, torch.randn(2, 3, 5), neg, None), ValueError,
                     r"f_gt shape \(2, 3, 5\) does not match f_pos shape \(2, 3, 4\)"),
        "neg_shape": ((pos, gt, torch.randn(4, 3, 3, 4), None), ValueError,
                      r"f_neg must have shape \(m, \*f_pos.shape\) = \(m, 2, 3, 4\), got \(4, 3, 3, 4\)"),
        "neg_dims": ((pos, gt, torch.randn(2, 3, 4), None), ValueError, r"f_neg must have shape"),
        "no_negatives": ((pos, gt, torch.randn(0, 2, 3, 4), None), ValueError, r"no negatives \(m = 0\)"),
        "weights_shape": ((pos, gt, neg, torch.rand(2, 3)), ValueError,
                          r"neg_weights must have shape \(B, m\) = \(2, 4\), got \(2, 3\)"),
        "weights_int": ((pos, gt, neg, torch.ones(2, 4, dtype=torch.int64)), TypeError,
                        "neg_weights must be floating point"),
        "dtypes_differ": ((pos, gt.double(), neg, None), TypeError, r"must share one dtype"),
        "int_features": ((pos.long(), gt.long(), neg.long(), None), TypeError, r"must be floating point"),
        "empty_sample": ((torch.randn(2, 0), torch.randn(2, 0), torch.randn(4, 2, 0), None), ValueError,
                         "no elements per sample"),
        "empty_batch": ((torch.randn(0, 3), torch.randn(0, 3), torch.randn(4, 0, 3), None), ValueError,
                        r"empty batch"),
    }


class TestCprDistances(KernelOpTester):
    fn = cpr_distances
    reference = cpr_distances_reference
    dispatcher = DISPATCHER
    output_names = ("l_pos", "l_neg")
    # bfloat16 runs in test_matches_reference under this op's own budget (compare), so there is no
    # separate half-precision test; every case runs in both layouts, the strided one being the
    # non-contiguous case.
    dtypes = (torch.float64, torch.float32, torch.bfloat16)
    cases = {f"{layout}-m{m}-b{batch}-{'weighted' if weighted else 'unweighted'}":
             (batch, m, (3, 5, 7), layout, weighted, 100 * m + 10 * batch)
             for weighted, layout, batch, m in itertools.product((False, True), ("views", "strided"), (1, 3),
                                                                 (1, 2, 4))}
    # Several chunks per sample with a ragged last chunk, a single element, more negatives than one group.
    odd_cases = {f"odd_{'x'.join(map(str, trailing))}_m{m}": (2, m, trailing, "views", True, 7)
                 for trailing, m in (((9000,), 3), ((4, 33, 65), 5), ((1,), 2), ((2, 1, 3), 9))}
    gradcheck_cases = {"weighted": _gradcheck(True), "unweighted": _gradcheck(False)}
    dispatch_case = (2, 2, (3, 4), "views", True, 13)
    fallback_dtype = None           # every backend takes every floating dtype cpr_distances supports
    opcheck_variants = {"unweighted": False, "weighted": True}
    test_low_precision_error_budget = None
    test_non_contiguous_inputs = None
    test_auto_falls_back_to_reference_and_says_so = None

    def reference_cases(self):
        odd = [(name, case, torch.float64) for name, case in self.odd_cases.items()]
        return super().reference_cases() + odd

    def make_inputs(self, case, dtype, device):
        if callable(case):
            return case(dtype, device)
        batch, m, trailing, layout, weighted, seed = case
        return _inputs(batch, m, trailing, dtype, device, layout, weighted, seed)

    def compare(self, got, inputs, dtype):
        exact = run(cpr_distances_reference, inputs, exact=True)
        low = run(cpr_distances_reference, inputs)
        for name, g, e, lo in zip(self.names(inputs), got, exact, low):
            assert g.dtype == dtype and g.shape == e.shape, name
            err = (g.double() - e).abs().max().item()
            if dtype == torch.float64:
                budget = 1e-12 * (1 + e.abs().max().item())
            else:
                # flash-attention's error budget: twice PyTorch's own error in this dtype, plus one rounding.
                budget = (2 * (lo.double() - e).abs().max().item()
                          + torch.finfo(dtype).eps * e.abs().max().item())
            assert err <= budget, f"{dtype}/{name}: error {err:.3g} > budget {budget:.3g}"

    def opcheck_calls(self, backend, device, weighted):
        f_pos, f_gt, f_neg, weights = _opcheck_args(device, weighted)
        if backend == "triton":
            return [(torch.ops.cpl_fast.cpr_distances_triton.default, (f_pos, f_gt, f_neg, weights))]
        grads = [torch.randn(2, dtype=torch.float64, device=device) for _ in range(2)]
        return [(torch.ops.cpl_fast.cpr_distances.default, (f_pos, f_gt, f_neg, weights)),
                (torch.ops.cpl_fast._cpr_distances_backward.default,
                 (*grads, f_pos.detach(), f_gt, f_neg.detach(), weights))]

    def bad_inputs(self):
        return {name: (args, {}, error, match) for name, (args, error, match) in _bad_calls().items()}


@needs_ext
def test_cpu_is_bitwise_reproducible_and_thread_independent():
    leaves, build = _case(2, 4, (5, 50, 50), torch.float32, "cpu", "views", True, seed=11)
    upstream = [torch.randn(2), torch.randn(2)]
    threads = torch.get_num_threads()
    try:
        runs = []
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            runs.append(_run(lambda *a: cpr_distances(*a, backend="cpu"), leaves, build, upstream))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0][0] + runs[0][1], other[0] + other[1]):
            assert torch.equal(a, b)


@needs_ext
def test_compiles_with_fullgraph():
    leaves, build = _case(2, 2, (3, 4), torch.float64, "cpu", "views", True, seed=13)
    fn = torch.compile(lambda *a: cpr_distances(*a, backend="cpu"), backend="aot_eager", fullgraph=True)
    got = _run(fn, leaves, build, [torch.ones(2, dtype=torch.float64)] * 2)
    want = _run(cpr_distances_reference, leaves, build, [torch.ones(2, dtype=torch.float64)] * 2)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b)


@needs_ext
@pytest.mark.parametrize("name", list(_bad_calls()))
def test_clear_errors_from_the_compiled_op(name):
    args, error, message = _bad_calls()[name]
    with pytest.raises(error, match=message.split(r" \(")[0]):
        torch.ops.cpl_fast.cpr_distances(*args)


@pytest.mark.parametrize("backend,device", [param(b, d, device=d, id=f"{b}-{d}") for b, d in PAIRS])
def test_neg_weights_get_no_gradient(backend, device):
    """The fused backward treats neg_weights as constants (a task-similarity matrix)."""
    backend_or_skip(DISPATCHER, backend, device)
    leaves, build = _case(2, 2, (3,), torch.float64, device, "views", False, seed=17)
    f_pos, f_gt, f_neg, _ = build(*[leaf.requires_grad_(True) for leaf in leaves])
    weights = torch.rand(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    l_pos, l_neg = cpr_distances(f_pos, f_gt, f_neg, weights, backend=backend)
    (l_pos.sum() + l_neg.sum()).backward()
    assert weights.grad is None
    assert all(leaf.grad is not None for leaf in leaves)

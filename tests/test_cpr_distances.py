"""cpl_fast.ops.cpr_distances: every available backend against the plain-PyTorch oracle.

The Triton kernels run on CUDA devices, or on the CPU under ``TRITON_INTERPRET=1``; the variable must be set
before triton is imported, so ``test_triton_interpreted_in_subprocess`` re-runs this file's Triton tests in a
child process with it set, leaving the rest of the suite unaffected.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpl_fast import _extension
from cpl_fast.ops import cpr_distances, cpr_distances_reference
from cpl_fast.ops.cpr_distances import DISPATCHER

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _available(backend: str, device: str) -> bool:
    return not DISPATCHER.backends[backend].available(torch.device(device))


# (backend, device) pairs under test. The Triton kernels run on the CPU only in the interpreted child process.
FAST = [(b, d) for d in DEVICES for b in ("cpu", "cuda", "triton")
        if _available(b, d) and (b != "triton" or d == "cuda" or INTERPRETED)]
COMPILED = [(b, d) for b, d in FAST if b in ("cpu", "cuda")]
TRITON = [(b, d) for b, d in FAST if b == "triton"]
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


def _check(backend: str, device: str, dtype: torch.dtype, batch: int, m: int, trailing, layout: str,
           weighted: bool, seed: int) -> None:
    leaves, build = _case(batch, m, trailing, dtype, device, layout, weighted, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(batch, generator=gen, dtype=torch.float64).to(device) for _ in range(2)]
    got = _run(lambda *a: cpr_distances(*a, backend=backend), leaves, build, [u.to(dtype) for u in upstream])
    exact = _run(cpr_distances_reference, [leaf.double() for leaf in leaves], build, upstream)
    low = _run(cpr_distances_reference, leaves, build, [u.to(dtype) for u in upstream])
    names = ["l_pos", "l_neg"] + [f"grad of leaf {i}" for i in range(len(leaves))]
    for name, g, e, lo in zip(names, got[0] + got[1], exact[0] + exact[1], low[0] + low[1]):
        assert g.dtype == dtype and g.shape == e.shape, name
        err = (g.double() - e).abs().max().item()
        if dtype == torch.float64:
            budget = 1e-12 * (1 + e.abs().max().item())
        else:
            # flash-attention's error budget: twice PyTorch's own error in this dtype, plus one rounding.
            budget = (2 * (lo.double() - e).abs().max().item()
                      + torch.finfo(dtype).eps * e.abs().max().item())
        assert err <= budget, f"{backend}/{dtype}/{name}: error {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["views", "strided"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(backend, device, dtype, m, batch, layout, weighted):
    _check(backend, device, dtype, batch, m, (3, 5, 7), layout, weighted, seed=100 * m + 10 * batch)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("trailing,m", [((9000,), 3), ((4, 33, 65), 5), ((1,), 2), ((2, 1, 3), 9)])
def test_matches_reference_chunked_and_odd_shapes(backend, device, trailing, m):
    """Several chunks per sample with a ragged last chunk, a single element, more negatives than one group."""
    _check(backend, device, torch.float64, 2, m, trailing, "views", True, seed=7)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + COMPILED + TRITON)
def test_gradcheck(backend, device):
    gen = torch.Generator().manual_seed(3)
    args = [torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
            for s in ((2, 3, 4), (2, 3, 4), (3, 2, 3, 4))]
    weights = torch.rand(2, 3, generator=gen, dtype=torch.float64).to(device)
    fast = backend == "triton" and INTERPRETED  # the interpreter is slow; fast mode checks random projections
    assert torch.autograd.gradcheck(lambda p, g, n: cpr_distances(p, g, n, weights, backend=backend), args,
                                    fast_mode=fast)
    assert torch.autograd.gradcheck(lambda p, g, n: cpr_distances(p, g, n, None, backend=backend), args,
                                    fast_mode=fast)


def _opcheck_args(device: str, weighted: bool):
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    f_gt = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64).to(device)
    weights = torch.rand(2, 2, generator=gen, dtype=torch.float64).to(device) if weighted else None
    return feats[:2], f_gt, feats[2:].view(2, 2, 2, 3), weights


@needs_ext
@pytest.mark.parametrize("device", [d for b, d in COMPILED])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_compiled(device, weighted):
    f_pos, f_gt, f_neg, weights = _opcheck_args(device, weighted)
    torch.library.opcheck(torch.ops.cpl_fast.cpr_distances.default, (f_pos, f_gt, f_neg, weights))
    grads = [torch.randn(2, dtype=torch.float64, device=device) for _ in range(2)]
    torch.library.opcheck(torch.ops.cpl_fast._cpr_distances_backward.default,
                          (*grads, f_pos.detach(), f_gt, f_neg.detach(), weights))


@pytest.mark.parametrize("device", [d for b, d in TRITON])
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_opcheck(device, weighted):
    from cpl_fast.kernels import cpr_distances as kernels  # noqa: F401  (registers the triton ops)

    f_pos, f_gt, f_neg, weights = _opcheck_args(device, weighted)
    # Under TRITON_INTERPRET=1, wrap_triton launches the kernel eagerly (it cannot be traced), so the
    # fake-tensor and AOT checks only run where the kernels are compiled (CUDA).
    utils = ("test_schema", "test_autograd_registration") if device == "cpu" else None
    kwargs = {"test_utils": utils} if utils else {}
    torch.library.opcheck(torch.ops.cpl_fast.cpr_distances_triton.default, (f_pos, f_gt, f_neg, weights),
                          **kwargs)


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreted run")
def test_triton_interpreted_in_subprocess():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton and not subprocess",
         str(Path(__file__))],
        env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


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
def test_auto_picks_cpu_backend():
    assert DISPATCHER.select(torch.zeros(1), backend="auto", device=torch.device("cpu")).name == "cpu"


@needs_ext
def test_compiles_with_fullgraph():
    leaves, build = _case(2, 2, (3, 4), torch.float64, "cpu", "views", True, seed=13)
    fn = torch.compile(lambda *a: cpr_distances(*a, backend="cpu"), backend="aot_eager", fullgraph=True)
    got = _run(fn, leaves, build, [torch.ones(2, dtype=torch.float64)] * 2)
    want = _run(cpr_distances_reference, leaves, build, [torch.ones(2, dtype=torch.float64)] * 2)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b)


def _bad_calls():
    pos, gt, neg = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(4, 2, 3, 4)
    return [
        ((pos, torch.randn(2, 3, 5), neg, None), ValueError,
         r"f_gt shape \(2, 3, 5\) does not match f_pos shape \(2, 3, 4\)"),
        ((pos, gt, torch.randn(4, 3, 3, 4), None), ValueError,
         r"f_neg must have shape \(m, \*f_pos.shape\) = \(m, 2, 3, 4\), got \(4, 3, 3, 4\)"),
        ((pos, gt, torch.randn(2, 3, 4), None), ValueError, r"f_neg must have shape"),
        ((pos, gt, torch.randn(0, 2, 3, 4), None), ValueError, r"no negatives \(m = 0\)"),
        ((pos, gt, neg, torch.rand(2, 3)), ValueError,
         r"neg_weights must have shape \(B, m\) = \(2, 4\), got \(2, 3\)"),
        ((pos, gt, neg, torch.ones(2, 4, dtype=torch.int64)), TypeError,
         "neg_weights must be floating point"),
        ((pos, gt.double(), neg, None), TypeError, r"must share one dtype"),
        ((pos.long(), gt.long(), neg.long(), None), TypeError, r"must be floating point"),
        ((torch.randn(2, 0), torch.randn(2, 0), torch.randn(4, 2, 0), None), ValueError,
         "no elements per sample"),
        ((torch.randn(0, 3), torch.randn(0, 3), torch.randn(4, 0, 3), None), ValueError, r"empty batch"),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_clear_errors(backend, index):
    args, error, message = _bad_calls()[index]
    with pytest.raises(error, match=message):
        cpr_distances(*args, backend=backend)


@needs_ext
@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_clear_errors_from_the_compiled_op(index):
    args, error, message = _bad_calls()[index]
    with pytest.raises(error, match=message.split(r" \(")[0]):
        torch.ops.cpl_fast.cpr_distances(*args)


@pytest.mark.parametrize("backend,device", COMPILED + TRITON)
def test_neg_weights_get_no_gradient(backend, device):
    """The fused backward treats neg_weights as constants (a task-similarity matrix)."""
    leaves, build = _case(2, 2, (3,), torch.float64, device, "views", False, seed=17)
    f_pos, f_gt, f_neg, _ = build(*[leaf.requires_grad_(True) for leaf in leaves])
    weights = torch.rand(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    l_pos, l_neg = cpr_distances(f_pos, f_gt, f_neg, weights, backend=backend)
    (l_pos.sum() + l_neg.sum()).backward()
    assert weights.grad is None
    assert all(leaf.grad is not None for leaf in leaves)

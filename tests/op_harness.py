"""The shared tests of cpl_fast's ops, in the manner of torchvision's ``RoIOpTester``.

An op's test class subclasses :class:`OpTester` (:class:`KernelOpTester` when the op has a dispatcher and
registered kernels) and supplies the op (``fn``, called with ``backend=``), its plain-PyTorch ``reference``,
an input maker (:meth:`OpTester.make_inputs`: fresh random leaves, never zeros, and the function that turns
them into the op's arguments, so that strided views survive the harness's copies), its cases (odd shapes,
non-contiguous variants, gradcheck-sized ones) and its bad inputs with the error each must raise. The
harness provides the parametrised tests: every (backend, device) pair against the reference in float64 and
float32 and the half types' error budget, non-contiguous inputs, gradcheck, ``torch.library.opcheck`` of
the registered ops, named errors for bad inputs, dispatch, and the re-run of the Triton cases under
``TRITON_INTERPRET=1`` in a child process (it must be set before triton is imported). Cases on a CUDA
device carry the ``gpu`` marker (scripts/gpu_check.sh); a backend that cannot run here skips with the
dispatcher's own reasons.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import cpl_fast.ops

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-5)}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# The Triton kernels on the GPU when there is one, else interpreted on the CPU (in the child process).
PAIRS = (("cpu", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu"), ("cuda", "cuda"))
LOW_PRECISION = (("cpu", "cpu", torch.bfloat16),) + tuple(
    (b, "cuda", dt) for b in ("triton", "cuda") for dt in (torch.bfloat16, torch.float16))


def param(*values, device: str, id: str):
    """A parameter set; the ``gpu`` marker on the cases that run on a CUDA device."""
    return pytest.param(*values, id=id, marks=[pytest.mark.gpu] if device == "cuda" else [])


def backend_or_skip(dispatcher, name: str, device: str) -> None:
    """Skip with the backend's own reasons when it cannot run on ``device`` in this process."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if name == "triton" and device == "cpu" and not INTERPRETED:
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1: "
                    "covered by test_interpreted_kernels_in_subprocess")
    if dispatcher is None or name not in dispatcher.backends:
        return
    reasons = dispatcher.backends[name].available(torch.device(device))
    if reasons:
        pytest.skip(f"{name} backend unavailable: {'; '.join(reasons)}")


def run_interpreted(test_file: str) -> None:
    """Run ``test_file``'s Triton cases in a child process with TRITON_INTERPRET=1; fail with its output.

    Every CPU case there must run: the only skips allowed are the CUDA cases and a case that says it
    cannot run interpreted.
    """
    if INTERPRETED:
        pytest.skip("already under TRITON_INTERPRET=1: the Triton cases run in this process")
    if HAS_CUDA:
        pytest.skip("the Triton cases run on the CUDA device in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "not slow",
         "-k", "triton", test_file],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    output = result.stdout.strip()
    summary = output.splitlines()[-1] if output else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary, summary
    skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    allowed = ("no CUDA device", "not under TRITON_INTERPRET=1")
    unexpected = [line for line in skips if not any(reason in line for reason in allowed)]
    assert not unexpected, "\n".join(unexpected)


@dataclass
class Inputs:
    """One call's inputs: ``leaves`` (the tensors differentiated), ``build(*leaves)`` -> the op's positional
    arguments (views of the leaves, constants), and ``grads``, the upstream gradient of each output in float64
    (cast to the output's dtype, except for the float64 ground truth)."""

    leaves: list[torch.Tensor]
    build: Callable[..., tuple]
    grads: list[torch.Tensor]

    def args(self) -> tuple:
        return self.build(*self.leaves)


def run(fn: Callable, inputs: Inputs, exact: bool = False) -> list[torch.Tensor]:
    """``fn``'s outputs and the leaves' gradients; ``exact``: on the leaves widened to float64."""
    leaves = [(leaf.double() if exact else leaf).detach().clone().requires_grad_(True)
              for leaf in inputs.leaves]
    outputs = fn(*inputs.build(*leaves))
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    upstream = [g.double() if exact else g.to(o.dtype) for g, o in zip(inputs.grads, outputs)]
    grads = torch.autograd.grad(outputs, leaves, upstream)
    return [o.detach() for o in outputs] + list(grads)


def low_precision_budget(got: list[torch.Tensor], low: list[torch.Tensor], exact: list[torch.Tensor],
                         dtype: torch.dtype, names: Sequence[str]) -> None:
    """Per element: |kernel - exact| <= 2 |torch in ``dtype`` - exact| + 1e-2 max(1, max |exact|)."""
    for name, g, lo, want in zip(names, got, low, exact):
        assert g.dtype == dtype, name
        atol = 1e-2 * max(1.0, want.abs().max().item())
        err = (g.double() - want).abs()
        budget = 2 * (lo.double() - want).abs() + atol
        assert bool((err <= budget).all()), f"{name}: max excess {(err - budget).max().item():.3g}"


def low_precision_check(fn_ref, fn_kernel, inputs, grad_out, dtype) -> None:
    """:func:`low_precision_budget` for ``fn_kernel(*inputs)`` (all differentiated) with one output."""
    case = Inputs(list(inputs), lambda *leaves: leaves, [grad_out.double()])
    names = ["out"] + [f"grad of input {i}" for i in range(len(inputs))]
    low_precision_budget(run(fn_kernel, case), run(fn_ref, case), run(fn_ref, case, exact=True), dtype, names)


def _non_contiguous(values) -> bool:
    return any(isinstance(v, torch.Tensor) and not v.is_contiguous() for v in values)


class OpTester:
    """The shared tests of one op. Subclasses set the attributes below and implement :meth:`make_inputs`
    and :meth:`bad_inputs`; a shared test that does not apply to an op is set to ``None`` in its class."""

    fn: Callable                            # the op; takes ``backend=``
    reference: Callable                     # its plain-PyTorch oracle (same positional arguments)
    dispatcher = None                       # the op's Dispatcher, when it has one
    backends: Sequence[tuple[str, str]] = PAIRS
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32)
    tol: dict = TOL
    output_names: Sequence[str] = ("out",)
    cases: dict[str, Any] = {}              # reference cases, run in every dtype of ``dtypes``
    low_precision_cases: Sequence[str] = ()  # keys of ``cases`` run in the half types (LOW_PRECISION)
    non_contiguous_cases: dict[str, Any] = {}   # float64; the maker returns strided views
    gradcheck_cases: dict[str, Any] = {}    # float64, small
    bad_input_backends: Sequence[str] = ("reference", "cpu", "auto")

    def make_inputs(self, case: Any, dtype: torch.dtype, device: str) -> Inputs:
        raise NotImplementedError

    def bad_inputs(self) -> dict[str, tuple[tuple, dict, type, str]]:
        """``{id: (args, kwargs, error type, regex of its message)}``, made fresh on every call."""
        raise NotImplementedError

    # --- parametrisation --------------------------------------------------------------------------------

    def reference_cases(self) -> list[tuple[str, Any, torch.dtype]]:
        """``(id, case, dtype)`` of test_matches_reference: every case in every dtype."""
        return [(name, case, dtype) for dtype in self.dtypes for name, case in self.cases.items()]

    def pytest_generate_tests(self, metafunc) -> None:
        params = getattr(self, f"_params_{metafunc.function.__name__}", None)
        if params is not None:
            names, values = params()
            metafunc.parametrize(names, values)

    def _params_test_matches_reference(self):
        cases = self.reference_cases()
        return "backend,device,dtype,case", [
            param(b, d, dtype, case, device=d, id=f"{b}-{d}-{DTYPE_IDS[dtype]}-{name}")
            for b, d in self.backends for name, case, dtype in cases]

    def _params_test_low_precision_error_budget(self):
        return "backend,device,dtype,case", [
            param(b, d, dtype, self.cases[name], device=d, id=f"{b}-{d}-{DTYPE_IDS[dtype]}-{name}")
            for b, d, dtype in LOW_PRECISION for name in self.low_precision_cases]

    def _params_test_non_contiguous_inputs(self):
        cases = self.non_contiguous_cases.items()
        return "backend,device,case", [param(b, d, case, device=d, id=f"{b}-{d}-{name}")
                                       for b, d in self.backends for name, case in cases]

    def _params_test_gradcheck(self):
        pairs = [("reference", "cpu"), *self.backends]
        return "backend,device,case", [param(b, d, case, device=d, id=f"{b}-{d}-{name}")
                                       for b, d in pairs for name, case in self.gradcheck_cases.items()]

    def _params_test_bad_inputs(self):
        return "backend,name", [pytest.param(b, name, id=f"{b}-{name}")
                                for b in self.bad_input_backends for name in self.bad_inputs()]

    # --- helpers ----------------------------------------------------------------------------------------

    def call(self, backend: str) -> Callable:
        return lambda *args: type(self).fn(*args, backend=backend)

    def names(self, inputs: Inputs) -> list[str]:
        return list(self.output_names) + [f"grad of leaf {i}" for i in range(len(inputs.leaves))]

    def compare(self, got: list[torch.Tensor], inputs: Inputs, dtype: torch.dtype) -> None:
        """float64/float32: ``self.tol`` against the reference in that dtype; the half types: the budget of
        :func:`low_precision_budget` (twice PyTorch's own error in that dtype)."""
        reference = type(self).reference
        names = self.names(inputs)
        if dtype in self.tol:
            want = run(reference, inputs)
            for name, g, w in zip(names, got, want):
                torch.testing.assert_close(g, w, **self.tol[dtype], msg=lambda m, name=name: f"{name}: {m}")
        else:
            exact = run(reference, inputs, exact=True)
            low_precision_budget(got, run(reference, inputs), exact, dtype, names)

    def check(self, backend: str, device: str, dtype: torch.dtype, case: Any) -> None:
        inputs = self.make_inputs(case, dtype, device)
        self.compare(run(self.call(backend), inputs), inputs, dtype)

    # --- the shared tests -------------------------------------------------------------------------------

    def test_matches_reference(self, backend, device, dtype, case):
        backend_or_skip(self.dispatcher, backend, device)
        self.check(backend, device, dtype, case)

    def test_low_precision_error_budget(self, backend, device, dtype, case):
        backend_or_skip(self.dispatcher, backend, device)
        self.check(backend, device, dtype, case)

    def test_non_contiguous_inputs(self, backend, device, case):
        backend_or_skip(self.dispatcher, backend, device)
        inputs = self.make_inputs(case, torch.float64, device)
        assert _non_contiguous(inputs.args()), "the case's arguments are all contiguous"
        self.compare(run(self.call(backend), inputs), inputs, torch.float64)

    def test_gradcheck(self, backend, device, case):
        if backend != "reference":
            backend_or_skip(self.dispatcher, backend, device)
        inputs = self.make_inputs(case, torch.float64, device)
        leaves = tuple(leaf.detach().clone().requires_grad_(True) for leaf in inputs.leaves)
        fn = type(self).reference if backend == "reference" else self.call(backend)
        # The interpreter is slow: fast mode checks random projections of the Jacobian.
        fast = backend == "triton" and INTERPRETED
        assert torch.autograd.gradcheck(lambda *t: fn(*inputs.build(*t)), leaves, fast_mode=fast)

    def test_bad_inputs(self, backend, name):
        args, kwargs, error, match = self.bad_inputs()[name]
        with pytest.raises(error, match=match):
            type(self).fn(*args, **kwargs, backend=backend)


class KernelOpTester(OpTester):
    """The shared tests of an op with a dispatcher and registered kernels (compiled and Triton)."""

    dispatch_case: Any = None               # small float inputs for the dispatch tests (a case of ``cases``)
    fallback_dtype: torch.dtype | None = torch.float16     # a dtype the cpu backend does not take
    opcheck_variants: dict[str, Any] = {"": None}

    def opcheck_calls(self, backend: str, device: str, variant: Any) -> list[tuple[Any, tuple]]:
        """``(op overload, args)`` pairs for ``torch.library.opcheck`` of ``backend``'s ops on ``device``."""
        raise NotImplementedError

    def _params_test_opcheck(self):
        return "backend,device,variant", [
            param(b, d, variant, device=d, id=f"{b}-{d}" + (f"-{name}" if name else ""))
            for b, d in self.backends for name, variant in self.opcheck_variants.items()]

    def _params_test_forcing_the_reference_backend(self):
        return "how", ["argument", "environment"]

    def _params_test_unknown_backend_is_a_value_error(self):
        return "how", ["argument", "environment"]

    def dispatch_args(self, dtype: torch.dtype = torch.float32) -> tuple:
        return self.make_inputs(self.dispatch_case, dtype, "cpu").args()

    def test_opcheck(self, backend, device, variant):
        backend_or_skip(self.dispatcher, backend, device)
        # Under TRITON_INTERPRET=1, torch's wrap_triton hands the interpreted kernel back untraced, so it
        # would run on fake tensors: the fake-tensor and AOT-dispatch checks need a real GPU kernel.
        utils = (("test_schema", "test_autograd_registration") if backend == "triton" and device == "cpu"
                 else torch.library._OPCHECK_DEFAULT_UTILS)
        calls = self.opcheck_calls(backend, device, variant)
        assert calls
        for op, args in calls:
            torch.library.opcheck(op, args, test_utils=utils)

    def test_auto_picks_cpu_backend_on_cpu(self):
        backend_or_skip(self.dispatcher, "cpu", "cpu")
        args = self.dispatch_args()
        assert self.dispatcher.select(*args, device=torch.device("cpu")).name == "cpu"
        grad_args = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args]
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:  # the cpu backward has no atomics, so deterministic mode keeps it
            assert self.dispatcher.select(*grad_args, device=torch.device("cpu")).name == "cpu"
        finally:
            torch.use_deterministic_algorithms(previous)

    def test_forcing_the_reference_backend(self, how, monkeypatch):
        args = self.dispatch_args(torch.float64)
        called = []
        original = self.dispatcher.backends["reference"]
        spy = type(original)("reference", lambda *a: called.append(1) or original.fn(*a), original.available)
        monkeypatch.setitem(self.dispatcher.backends, "reference", spy)
        if how == "environment":
            monkeypatch.setenv("CPL_FAST_BACKEND", "reference")
            out = type(self).fn(*args)
        else:
            monkeypatch.setenv("CPL_FAST_BACKEND", "cpu")      # the argument wins over the variable
            out = type(self).fn(*args, backend="reference")
        assert called == [1]
        torch.testing.assert_close(out, type(self).reference(*args), rtol=0, atol=0)

    def test_forced_unavailable_backend_raises_with_reasons(self, monkeypatch):
        args = self.dispatch_args()
        unavailable = r"backend 'cuda' cannot run this call: .*runs on cuda tensors, not cpu"
        with pytest.raises(RuntimeError, match=unavailable):
            type(self).fn(*args, backend="cuda")
        if not INTERPRETED:
            with monkeypatch.context() as env:
                env.setenv("CPL_FAST_BACKEND", "triton")
                with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                    type(self).fn(*args)
        if self.fallback_dtype is not None and self.dispatcher.kernels.load_error is None:
            name = str(self.fallback_dtype).removeprefix("torch.")
            takes = f"the cpu backend takes float32, float64, bfloat16, not {name}"
            with pytest.raises(RuntimeError, match=takes):
                type(self).fn(*self.dispatch_args(self.fallback_dtype), backend="cpu")

    def test_unknown_backend_is_a_value_error(self, how, monkeypatch):
        args = self.dispatch_args()
        if how == "environment":
            monkeypatch.setenv("CPL_FAST_BACKEND", "fast")
            with pytest.raises(ValueError, match=r"unknown backend 'fast' \(from CPL_FAST_BACKEND\)"):
                type(self).fn(*args)
        else:
            with pytest.raises(ValueError, match=r"unknown backend 'fast' \(from backend=\)"):
                type(self).fn(*args, backend="fast")

    def test_auto_falls_back_to_reference_and_says_so(self, caplog):
        backend_or_skip(self.dispatcher, "cpu", "cpu")
        args = self.dispatch_args(self.fallback_dtype)
        self.dispatcher._announced.discard(("reference", "cpu"))
        with caplog.at_level(logging.WARNING, logger="cpl_fast"):
            out = type(self).fn(*args)
        name = str(self.fallback_dtype).removeprefix("torch.")
        assert "uses the 'reference' backend" in caplog.text and name in caplog.text
        torch.testing.assert_close(out, type(self).reference(*args))

    def test_available_backends_reports_the_op(self):
        report = cpl_fast.ops.available_backends("cpu")[self.dispatcher.op]
        assert report["reference"] == [] and report["cuda"]      # never on a CPU tensor
        assert (report["cpu"] == []) == (self.dispatcher.kernels.load_error is None)

    def test_auto_needs_torch_library_triton_op(self, monkeypatch, caplog):
        """A torch without torch.library.triton_op cannot load the Triton kernels: ``auto`` on CUDA passes
        over Triton and says why, and forcing it raises with that reason."""
        pytest.importorskip("triton")
        monkeypatch.delattr(torch.library, "triton_op")
        cuda = torch.device("cuda")
        assert any("triton_op" in reason for reason in self.dispatcher.report(cuda)["triton"])
        args = self.dispatch_args()
        self.dispatcher._announced.discard(("reference", cuda.type))
        with caplog.at_level(logging.WARNING, logger="cpl_fast"):
            chosen = self.dispatcher.select(*args, device=cuda)
        assert chosen.name != "triton"
        if chosen.name == "reference":
            assert re.search(r"triton: .*triton_op", caplog.text), caplog.text
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call: .*triton_op"):
            self.dispatcher.select(*args, backend="triton", device=cuda)

    def test_interpreted_kernels_in_subprocess(self):
        """Re-run this file's Triton cases with TRITON_INTERPRET=1 (it must be set before triton loads)."""
        run_interpreted(inspect.getfile(type(self)))

"""Backend selection shared by every op.

Each backend says why it cannot take a call (``not_supported_reasons``); ``auto`` walks the
device's priority list and takes the first backend with no reasons. ``CPL_FAST_BACKEND`` (read at
call time) or the ``backend=`` argument forces one; a forced backend that cannot run raises with
its reasons. When ``auto`` has to pass over the device's preferred backend it says so once.

Every op with kernels builds its dispatcher with :func:`kernel_dispatcher`, so that they all judge the
compiled extension (:class:`CompiledKernels`) and Triton (:func:`triton_reasons`, :class:`TritonKernels`)
by one rule and give the same reasons.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("cpl_fast")

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "CPL_FAST_BACKEND"
# What the compiled CPU kernels and the GPU kernels (CUDA, Triton) are instantiated for.
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``fn`` takes the op's arguments (without ``backend``). ``available(device)`` lists why the
    backend cannot run on that device at all (not built, not installed); ``supports(*args)`` why it
    cannot take these arguments (dtype, shape). Empty lists: it can. ``atomic_backward``: its backward
    accumulates with atomics, so it is not deterministic and ``auto`` avoids it under
    ``torch.use_deterministic_algorithms(True)``.
    """

    name: str
    fn: Callable
    available: Callable[[torch.device], list[str]]
    supports: Callable[..., list[str]] = lambda *args: []
    atomic_backward: bool = False


@dataclass
class Dispatcher:
    op: str
    backends: dict[str, Backend]
    priority: dict[str, Sequence[str]]
    kernels: CompiledKernels | None = None      # what cpl_fast._C registered for the op, when it has kernels
    _announced: set = field(default_factory=set)

    def report(self, device: torch.device) -> dict[str, list[str]]:
        """For every backend name, why it cannot run on ``device`` (empty list: available)."""
        return {name: (self.backends[name].available(device) if name in self.backends
                       else [f"{self.op} has no '{name}' backend"]) for name in BACKEND_NAMES}

    def not_supported_reasons(self, name: str, *args, device: torch.device) -> list[str]:
        backend = self.backends.get(name)
        if backend is None:
            return [f"{self.op} has no '{name}' backend"]
        reasons = list(backend.available(device))
        if not reasons:
            reasons = list(backend.supports(*args))
        if (backend.atomic_backward and torch.are_deterministic_algorithms_enabled()
                and torch.is_grad_enabled()
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            reasons.append("its backward uses atomics and deterministic algorithms are enabled")
        return reasons

    def select(self, *args, backend: str = "auto", device: torch.device) -> Backend:
        requested = requested_backend(backend)
        if requested != "auto":
            reasons = self.not_supported_reasons(requested, *args, device=device)
            if reasons:
                raise RuntimeError(f"cpl_fast.ops.{self.op}: backend '{requested}' cannot run this call: "
                                   + "; ".join(reasons))
            return self.backends[requested]

        order = self.priority.get(device.type, ("reference",))
        skipped = []
        for name in order:
            reasons = self.not_supported_reasons(name, *args, device=device)
            if not reasons:
                if skipped:
                    self._announce(name, device, skipped)
                return self.backends[name]
            skipped.append(f"{name}: {'; '.join(reasons)}")
        raise RuntimeError(f"cpl_fast.ops.{self.op}: no backend can run this call on {device.type}: "
                           + " | ".join(skipped))

    def __call__(self, *args, backend: str = "auto", device: torch.device):
        return self.select(*args, backend=backend, device=device).fn(*args)

    def _announce(self, chosen: str, device: torch.device, skipped: list[str]) -> None:
        key = (chosen, device.type)
        if key not in self._announced:
            self._announced.add(key)
            logger.warning("cpl_fast.ops.%s on %s uses the '%s' backend (%s)",
                           self.op, device.type, chosen, " | ".join(skipped))


def requested_backend(backend: str) -> str:
    """The backend a call asks for: ``backend``, else ``CPL_FAST_BACKEND`` (read at call time), else ``auto``.

    Raises ValueError for a name that is not a backend, saying where it came from.
    """
    requested = backend if backend != "auto" else os.environ.get(ENV_VAR, "auto").strip() or "auto"
    if requested != "auto" and requested not in BACKEND_NAMES:
        source = "backend=" if backend != "auto" else ENV_VAR
        raise ValueError(f"unknown backend '{requested}' (from {source}); "
                         f"choose one of {', '.join(BACKEND_NAMES)} or 'auto'")
    return requested


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_reasons(dtypes: tuple[torch.dtype, ...], name: str) -> Callable[..., list[str]]:
    """``supports(x, *rest)`` of a backend that takes ``dtypes``: the reason when ``x``'s dtype is not one."""
    def supports(x: torch.Tensor, *_args) -> list[str]:
        if x.dtype in dtypes:
            return []
        return [f"the {name} backend takes {', '.join(map(_dtype_name, dtypes))}, not {_dtype_name(x.dtype)}"]
    return supports


def triton_reasons(device: torch.device) -> list[str]:
    """Why Triton kernels cannot run on ``device`` (the CPU only under ``TRITON_INTERPRET=1``).

    The kernels register through ``torch.library.triton_op``/``wrap_triton``, which older torch releases
    lack; without them the kernels' module fails at import, so ``auto`` must pass over Triton rather than
    pick it and raise. Checked at call time, so that a test can take them away.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["triton is not installed"]
    missing = [name for name in ("triton_op", "wrap_triton") if not hasattr(torch.library, name)]
    if missing:
        return [f"torch {torch.__version__} has no torch.library.{' or '.join(missing)} "
                "(the Triton kernels register through it)"]
    if device.type == "cuda":
        return []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return []
    return [f"triton kernels run on CUDA devices (or the CPU under TRITON_INTERPRET=1), not {device.type}"]


class TritonKernels:
    """Availability of one op's Triton kernels: :func:`triton_reasons`, then the kernels' module imports.

    The module is imported lazily, on the first call that could run it (triton is slow to import and
    optional); importing it registers the op's ``triton_op``. A failed import is remembered with its error.
    """

    def __init__(self, module: str) -> None:
        self.module = module
        self._error: list[str | None] = []

    def reasons(self, device: torch.device) -> list[str]:
        reasons = triton_reasons(device)
        if reasons:
            return reasons
        if not self._error:
            try:
                importlib.import_module(self.module)
                self._error.append(None)
            except ImportError as exc:
                self._error.append(f"{self.module} failed to import: {exc}")
        return [self._error[0]] if self._error[0] is not None else []


class CompiledKernels:
    """Availability of one op's kernels in the compiled extension ``cpl_fast._C``.

    The extension is loaded and its registrations looked up once, here, so that the per-call check is
    a lookup of constants that torch.compile can trace through.
    """

    def __init__(self, op: str) -> None:
        from cpl_fast import _extension

        self.op = op
        self.load_error = _extension.load_error()
        self.has_kernel = {key: _extension.has_kernel(op, key) for key in ("CPU", "CUDA")}

    def reasons(self, device_type: str) -> Callable[[torch.device], list[str]]:
        """``available(device)`` of the backend that runs the ``device_type`` (cpu, cuda) kernel."""
        dispatch_key = device_type.upper()

        def available(device: torch.device) -> list[str]:
            reasons = []
            if device.type != device_type:
                reasons.append(f"the {device_type} backend runs on {device_type} tensors, not {device.type}")
            if self.load_error is not None:
                reasons.append(self.load_error)
            elif not self.has_kernel[dispatch_key]:
                reasons.append(f"cpl_fast._C was built without a {dispatch_key} kernel of {self.op}")
            return reasons
        return available


PRIORITY = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def kernel_dispatcher(op: str, *, reference: Callable, compiled: Callable, triton: Callable,
                      triton_module: str, cpu_dtypes: tuple[torch.dtype, ...],
                      gpu_dtypes: tuple[torch.dtype, ...],
                      atomic_backward: tuple[str, ...] = ()) -> Dispatcher:
    """The dispatcher of an op with the four backends: the plain-PyTorch ``reference``, the compiled
    extension's CPU and CUDA kernels (``compiled``), and the Triton kernels of ``triton_module``
    (``triton``). ``atomic_backward``: the backends whose backward accumulates with atomics."""
    kernels, triton_kernels = CompiledKernels(op), TritonKernels(triton_module)
    runs = {"cpu": (compiled, kernels.reasons("cpu"), cpu_dtypes),
            "cuda": (compiled, kernels.reasons("cuda"), gpu_dtypes),
            "triton": (triton, triton_kernels.reasons, gpu_dtypes)}
    backends = {"reference": Backend("reference", reference, available=lambda device: [])}
    for name, (fn, available, dtypes) in runs.items():
        backends[name] = Backend(name, fn, available=available, supports=dtype_reasons(dtypes, name),
                                 atomic_backward=name in atomic_backward)
    return Dispatcher(
        op=op,
        backends=backends,
        priority=PRIORITY,
        kernels=kernels,
    )

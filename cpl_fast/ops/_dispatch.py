"""Backend selection shared by every op.

Each backend says why it cannot take a call (``not_supported_reasons``); ``auto`` walks the
device's priority list and takes the first backend with no reasons. ``CPL_FAST_BACKEND`` (read at
call time) or the ``backend=`` argument forces one; a forced backend that cannot run raises with
its reasons. When ``auto`` has to pass over the device's preferred backend it says so once.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("cpl_fast")

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "CPL_FAST_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``fn`` takes the op's arguments (without ``backend``). ``available(device)`` lists why the
    backend cannot run on that device at all (not built, not installed); ``supports(*args)`` why it
    cannot take these arguments (dtype, shape). Empty lists: it can. ``atomic_backward``: its backward accumulates
    with atomics, so it is not deterministic and ``auto`` avoids it under
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
        requested = backend if backend != "auto" else os.environ.get(ENV_VAR, "auto").strip() or "auto"
        if requested != "auto":
            if requested not in BACKEND_NAMES:
                raise ValueError(f"unknown backend '{requested}' (from {'backend=' if backend != 'auto' else ENV_VAR}); "
                                 f"choose one of {', '.join(BACKEND_NAMES)} or 'auto'")
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


def triton_reasons(device: torch.device) -> list[str]:
    """Why Triton kernels cannot run on ``device`` (the CPU only under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["triton is not installed"]
    if device.type == "cuda":
        return []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return []
    return [f"triton kernels run on CUDA devices (or the CPU under TRITON_INTERPRET=1), not {device.type}"]

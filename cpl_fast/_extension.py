"""Loading of the compiled extension ``cpl_fast._C``; a failure is recorded, never raised at import."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

_BUILD_CONFIG = Path(__file__).with_name("_build_config.json")


@functools.cache
def load_error() -> str | None:
    """Import ``cpl_fast._C`` once; return None on success, else why it is unavailable."""
    try:
        from cpl_fast import _C  # noqa: F401  (registers the cpl_fast:: ops)
    except ImportError as exc:  # a missing build, or a CUDA build next to a CPU torch
        config = build_config()
        if config.get("extension") is False:
            return f"extension not built ({config.get('reason', 'pure-Python install')})"
        return f"cpl_fast._C failed to import: {exc}"
    return None


def build_config() -> dict:
    """What setup.py built (empty when the package was not installed through setup.py)."""
    try:
        return json.loads(_BUILD_CONFIG.read_text())
    except (OSError, ValueError):
        return {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``cpl_fast::<op>`` has a compiled kernel for ``dispatch_key`` (``"CPU"``/``"CUDA"``)."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cpl_fast::{op}", dispatch_key)

"""Ahead-of-time compile of a Triton kernel for sm_90 (no GPU needed: Triton ships ptxas), shared by the
backbone-op tests. Skips when triton or its compile API is missing."""
from __future__ import annotations

import pytest


def compile_for_sm90(kernel, pointers: dict[str, str], constexprs: dict[str, object], floats=(),
                     default_pointer: str = "*bf16") -> None:
    """Compile ``kernel`` with bf16 data pointers (``pointers`` overrides by name), i64 integers, fp32
    ``floats`` and the given ``constexprs``; assert a cubin came out."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {exc}")
    signature, fixed = {}, {}
    for position, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            fixed[(position,)] = constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, default_pointer)
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i64"
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=fixed),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]

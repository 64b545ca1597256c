"""FLOPs of the CPL training steps of ``test_cpr_step.py``, by shapes alone, in seconds instead of minutes.

``python bench/count_step_flops.py [CASE:PROVIDER ...]`` (default: every eager provider on every CPU case)
runs one step of each on the CPU with the convolutions and matrix products replaced by zeros of the right
shape (a FLOP count depends on shapes only, and the steps' control flow does not depend on those values),
and prints its FLOPs by bench/flops.py's rule and by ``torch.utils.flop_counter``'s own (whose
convolution backward is ``groups`` times too high), as a JSON line per step. This is how the GFLOP/step
columns of bench/results/cpr_step_*.md were recounted without rerunning the timings.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import flops  # noqa: E402
import test_cpr_step as steps  # noqa: E402

aten = torch.ops.aten
# The ops whose cost is counted and whose work is skipped here (every one torch's registry counts in a step).
PRODUCTS = {aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.bmm.default,
            aten.addmm.default, aten.baddbmm.default}


class ShapesOnlyProducts(TorchDispatchMode):
    """Convolutions and matrix products return zeros of their output's shape (found on the meta device)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS:
            return func(*args, **kwargs)
        to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
        out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        return tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t,
                        out)


def count(case: str, provider: str) -> dict:
    """``{case, provider, flops, flops_torch_rule}`` of one step (forward, backward and Adam)."""
    train_step, _ = steps.make_train_step(case, provider, torch.device("cpu"))
    ours, torch_rule = flops.flop_counter(), FlopCounterMode(display=False)
    # The counters sit above the zero-returning mode, so they see every product before it is skipped.
    with ShapesOnlyProducts(), torch_rule, ours:
        train_step()
    return {"case": case, "provider": provider, "flops": ours.get_total_flops(),
            "flops_torch_rule": torch_rule.get_total_flops(), "rule": flops.RULE}


def main(argv: list[str]) -> int:
    pairs = [arg.split(":", 1) for arg in argv] or [
        (case, provider) for case in steps.CPU_CASES for provider in steps.EAGER]
    for case, provider in pairs:
        # The GPU cases' activations (tens of GB, allocated here too: only the products are skipped) do
        # not fit a CPU machine; the GPU run counts them itself.
        if case not in steps.CPU_CASES or provider not in steps.EAGER:
            raise SystemExit(f"unknown CASE:PROVIDER {case}:{provider}; cases {', '.join(steps.CPU_CASES)}, "
                             f"providers {', '.join(steps.EAGER)}")
        print(json.dumps(count(case, provider)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

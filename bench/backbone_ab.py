"""The cpl model's L1 step with the reference ops, the fused ops without the depthwise-convolution op, without
the attention op, and all fused ops, timed in turn (interleaved rounds, so that drift of a shared machine hits
every variant alike).

    OMP_NUM_THREADS=1 python bench/backbone_ab.py --size 64 --batch 2 [--rounds 5] [--model cpl]

Prints the median CPU seconds per step of each variant and their ratios. CPU tensors come from
cpl_fast.memory's caching allocator, as in cpl-train.
"""
from __future__ import annotations

import argparse
import time

import torch

from cpl_fast import memory
from cpl_fast.models import build_model
from cpl_fast.models.restormer import Attention, DepthwiseConv3x3, set_backbone_ops

VARIANTS = ("reference", "fused_without_depthwise", "fused_without_attention", "fused")
WITHOUT = {"fused_without_depthwise": DepthwiseConv3x3, "fused_without_attention": Attention}


def _model(preset: str, variant: str):
    torch.manual_seed(0)
    model = build_model(preset)
    if variant == "reference":
        set_backbone_ops(model, "reference")
    elif variant in WITHOUT:
        for module in model.modules():
            if isinstance(module, WITHOUT[variant]):
                module.ops = "reference"
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="cpl", help="a cpl_fast.models preset (default cpl)")
    args = parser.parse_args()
    if memory.cpu_caching_available():
        memory.enable_cpu_caching()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=gen)
    target = torch.rand(args.batch, 3, args.size, args.size, generator=gen)
    runs = {variant: _model(args.model, variant) for variant in VARIANTS}

    def step(variant: str) -> float:
        model, optimizer = runs[variant]
        started = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        (model(x) - target).abs().mean().backward()
        optimizer.step()
        return time.process_time() - started

    for variant in VARIANTS:        # warm-up
        step(variant)
    seconds = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            seconds[variant].append(step(variant))
    median = {variant: sorted(values)[len(values) // 2] for variant, values in seconds.items()}
    print(f"{args.model} {args.size}px batch {args.batch}, {torch.get_num_threads()} thread(s), CPU s/step "
          f"(median of {args.rounds}): " + ", ".join(f"{v} {s:.3f}" for v, s in median.items()))
    print(f"reference / fused {median['reference'] / median['fused']:.2f}x; "
          + "; ".join(f"{v} / fused {median[v] / median['fused']:.2f}x" for v in WITHOUT))


if __name__ == "__main__":
    main()

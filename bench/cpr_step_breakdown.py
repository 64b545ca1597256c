"""Where a CPL step's time goes: feature network, encoder, decoder passes, loss and the rest.

``python bench/cpr_step_breakdown.py [--case demo|cpl-64-b2 ...] [--rounds N] [--trainer-steps N]
[--out FILE]``. One thread (``torch.set_num_threads(1)``), so the process's CPU time
(``time.process_time``) is the step's own compute even when other work shares the machine; every
number is a median over ``--rounds`` rounds, and the parts of a case are timed round-robin (one of
each per round), so a change of load hits all of them alike.

Cases: ``demo`` is ``cpl-train --preset demo``'s CPR step (the ``tiny`` model, EfficientNet-Lite0
features, 64x64 crops, batch 4, m = 4, the ``stable`` recipe's hinge form); ``cpl-64-b2`` is the
step benchmark's case (``bench/test_cpr_step.py``: the ``cpl`` model, VGG19 features with random
weights, 64x64, batch 2, m = 4, the difference form). Per case, forward and backward each:

* ``l1 step``: ``l1_step`` on the same model (the reference of the CPR/L1 ratio);
* ``fast step``: ``fast_cpl_step``, all of it; ``loop step``: ``loop_cpl_step`` (``--loop``);
* the fast step's parts, each alone on the step's own shapes: ``encoder`` (``encode`` on B rows),
  ``decoder`` (``decode`` of B (1 + m) rows with forced routings), ``phi(I+, I-)`` (the feature
  network on the B (1 + m) restorations, input gradient), ``phi(I_gt)`` (the target, no grad),
  ``loss`` (``CPRLoss`` on those features, its backward to them); ``rest``: the fast step minus
  the parts (sampler, routing bookkeeping, copies, L1 term, autograd overhead).

``--trainer-steps N`` also times ``Trainer.train_step`` of the demo config itself (the whole
optimiser step: CPR, router-bias update, health signals, Adam), CPR (optionally with
``cpr.negatives_per_step`` r for each ``--per-step r``) against the same model with objective
``l1``, against the demo's dense L1 baseline and against CPR over all ``m`` negatives per step (the
default recipe decodes 2), the trainers' steps interleaved; ``--no-parts`` times only these. ``--profile``
prints the fast step's top operators (``torch.profiler``, self CPU time). ``--levers`` times
alternatives of the fast step's layout on the same shapes: the decoder's B (1 + m) rows in one pass
or in 1 + m passes of B rows, with a contiguous or a channels-last encoder state, and the whole
fast step with ``neg_chunk=1``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cpl_fast.losses import CPRLoss, PerceptualFeatures
from cpl_fast.models import build_model, map_state
from cpl_fast.models.spm import Routing
from cpl_fast.train import MismatchedExperts, fast_cpl_step, loop_cpl_step
from cpl_fast.train.steps import l1_step

M = 4
# name: model preset, features, crop, batch, CPR form
CASES = {"demo": ("tiny", "efficientnet_lite0", 64, 4, "hinge"),
         "cpl-64-b2": ("cpl", "random_vgg19", 64, 2, "difference"),
         "cpl-64-b1": ("cpl", "random_vgg19", 64, 1, "difference")}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def setup(case: str):
    preset, features_name, crop, batch, form = CASES[case]
    torch.manual_seed(0)
    model = build_model(preset, route_bias=True).train() if case == "demo" else build_model(preset).train()
    features = (PerceptualFeatures.random_vgg19(seed=0) if features_name == "random_vgg19"
                else PerceptualFeatures.efficientnet_lite0())
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(batch, 3, crop, crop, generator=gen)
    degraded = (target + 0.1 * torch.randn(batch, 3, crop, crop, generator=gen)).clamp(0, 1)
    sampler = MismatchedExperts(model.num_prompts)
    return model, features, CPRLoss(alpha=0.01, form=form), sampler, (degraded, target)


_GRADS: dict[tuple, list[torch.Tensor]] = {}


def backward_of(outputs) -> None:
    """Backward of ``sum <output, g>`` with a fixed random ``g`` per output (made once per set of shapes,
    outside the timings)."""
    outputs = [o for o in outputs if o.requires_grad]
    key = tuple((tuple(o.shape), o.dtype) for o in outputs)
    if key not in _GRADS:
        gen = torch.Generator().manual_seed(0)
        _GRADS[key] = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]
    torch.autograd.backward(outputs, _GRADS[key])


def parts(case: str, loop: bool, per_step: tuple[int, ...],
          levers: bool = False) -> dict[str, Callable[[], None]]:
    """name -> a function doing that part once (forward and backward)."""
    model, features, loss, sampler, batch = setup(case)
    degraded, target = batch
    size = degraded.shape[0]
    step_gen = torch.Generator().manual_seed(0)

    def full(step, **kwargs) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            step(model, batch, features, loss, sampler, m=M, generator=step_gen, **kwargs).loss.backward()
        return run

    def l1() -> None:
        model.zero_grad(set_to_none=True)
        l1_step(model, batch).loss.backward()

    # The decoder's inputs: the encoder state (detached: the encoder is timed on its own) repeated to
    # B (1 + m) rows, and forced routings (the positive's own, then m mismatched ones).
    with torch.no_grad():
        state = model.encode(degraded)
        restored, routing = model.decode(state, return_routing=True)
    negatives = sampler(list(routing), M, generator=torch.Generator().manual_seed(1))
    rows = [Routing(torch.cat([r.indices] + [n[level].indices for n in negatives]),
                    torch.cat([r.weights] + [n[level].weights for n in negatives]), None)
            for level, r in enumerate(routing)]
    repeated = map_state(lambda t: t.repeat(1 + M, *([1] * (t.dim() - 1))), state)
    with torch.no_grad():
        images = model.decode(repeated, rows).clamp(0, 1)
        feats = features(images)
        gt_feats = features(target)

    def encoder() -> None:
        model.zero_grad(set_to_none=True)
        backward_of(list(model.encode(degraded)))

    def decoder() -> None:
        model.zero_grad(set_to_none=True)
        backward_of([model.decode(repeated, rows)])

    def phi() -> None:
        x = images.clone().requires_grad_(True)
        backward_of(features(x))

    def phi_gt() -> None:
        with torch.no_grad():
            features(target)

    def cpr_loss() -> None:
        leaves = [f.clone().requires_grad_(True) for f in feats]
        pos = [f[:size] for f in leaves]
        neg = [f[size:].view(M, size, *f.shape[1:]) for f in leaves]
        loss(pos, gt_feats, neg).loss.backward()

    out = {"l1 step": l1, "fast step": full(fast_cpl_step)}
    if levers:
        out["fast step, neg_chunk=1"] = full(fast_cpl_step, neg_chunk=1)
    for r in per_step:
        out[f"fast step, r={r}"] = full(fast_cpl_step, negatives_per_step=r)
    if loop:
        out["loop step"] = full(loop_cpl_step)
    out.update({"encoder": encoder, "decoder": decoder, "phi(I+, I-)": phi, "phi(I_gt)": phi_gt,
                "loss": cpr_loss})
    if levers:
        channels_last = map_state(lambda t: t.contiguous(memory_format=torch.channels_last), repeated)
        blocks = [(map_state(lambda t, i=i: t[i * size:(i + 1) * size], repeated),
                   [Routing(r.indices[i * size:(i + 1) * size], r.weights[i * size:(i + 1) * size], None)
                    for r in rows]) for i in range(1 + M)]

        def decoder_channels_last() -> None:
            model.zero_grad(set_to_none=True)
            backward_of([model.decode(channels_last, rows)])

        def decoder_blocks() -> None:
            model.zero_grad(set_to_none=True)
            backward_of([model.decode(block, entries) for block, entries in blocks])

        out.update({"lever: decoder, channels-last state": decoder_channels_last,
                    "lever: decoder, 1 + m passes of B rows": decoder_blocks})
        if CASES[case][1] == "efficientnet_lite0":
            from cpl_fast.losses.efficientnet import (
                EFFICIENTNET_LITE0_DEFAULT_TAPS,
                EFFICIENTNET_LITE_MEAN,
                EFFICIENTNET_LITE_STD,
                efficientnet_lite0_stages,
                pretrained_efficientnet_lite0,
            )

            stages = efficientnet_lite0_stages(pretrained_efficientnet_lite0(), fold=True)
            folded = PerceptualFeatures(stages, list(stages._modules), EFFICIENTNET_LITE0_DEFAULT_TAPS,
                                        EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)

            def phi_folded() -> None:
                x = images.clone().requires_grad_(True)
                backward_of(folded(x))

            out["lever: phi(I+, I-), batch norms folded"] = phi_folded
    return out


PARTS = ("encoder", "decoder", "phi(I+, I-)", "phi(I_gt)", "loss")


def time_parts(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    for fn in fns.values():     # warm-up: first-call allocations, oneDNN primitive caches
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def case_table(case: str, medians: dict[str, float], rounds: int) -> list[str]:
    preset, features_name, crop, batch, form = CASES[case]
    full = medians["fast step"]
    lines = [f"### {case}: `{preset}` model, {features_name}, {crop}x{crop}, batch {batch}, m = {M}, "
             f"{form} form ({rounds} rounds)", "",
             "| part | CPU ms (fwd + bwd) | share of the fast step |", "|---|---|---|"]
    rest = full - sum(medians[p] for p in PARTS)
    for name in PARTS:
        lines.append(f"| {name} | {medians[name] * 1e3:.1f} | {medians[name] / full:.0%} |")
    lines.append(f"| rest (sampler, bookkeeping, copies, L1) | {rest * 1e3:.1f} | {rest / full:.0%} |")
    lines.append(f"| **fast step** | **{full * 1e3:.1f}** | 100% |")
    levers = [name for name in medians if name.startswith("lever: ")]
    if levers:
        lines += ["", "| lever | CPU ms | / the part it replaces |", "|---|---|---|"]
        for name in levers:
            share = medians[name] / medians["phi(I+, I-)" if "phi" in name else "decoder"]
            lines.append(f"| {name[7:]} | {medians[name] * 1e3:.1f} | {share:.2f} |")
    lines += ["", "| step | CPU ms | / l1 step |", "|---|---|---|"]
    for name in medians:
        if "step" in name:
            lines.append(f"| {name} | {medians[name] * 1e3:.1f} | {medians[name] / medians['l1 step']:.2f} |")
    if "loop step" in medians:
        lines += ["", f"loop / fast: {medians['loop step'] / full:.2f}x"]
    return lines + [""]


def profile_lines(fn: Callable[[], None], top: int = 15) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    lines = ["| operator | calls | self CPU ms | share |", "|---|---|---|---|"]
    for e in rows:
        lines.append(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:.1f} "
                     f"| {e.self_cpu_time_total / total:.0%} |")
    return lines + [""]


def trainer_lines(steps: int, per_step: tuple[int, ...]) -> list[str]:
    """Median ``Trainer.train_step`` CPU time of the demo config: CPR (and r-subsampled CPR) vs L1."""
    from cpl_fast.train import Trainer, load_config

    variants = {"CPR (demo default)": [], "L1, same model (tiny)": ["objective=l1"],
                "L1, dense baseline (tiny_dense)": ["objective=l1", "model.preset=tiny_dense"],
                "CPR, all m negatives": ["cpr.negatives_per_step=null"],
                "CPR, all m negatives, neg_chunk=1": ["cpr.negatives_per_step=null", "cpr.neg_chunk=1"]}
    for r in per_step:
        variants[f"CPR, negatives_per_step={r}"] = [f"cpr.negatives_per_step={r}"]
    trainers = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, overrides in variants.items():
            config = load_config("demo", overrides=["logging.progress=false", *overrides])
            trainers[name] = Trainer(config, Path(folder) / str(len(trainers)), log=lambda message: None)
        for trainer in trainers.values():   # first step: calibration of alpha, warm-up
            trainer.train_step()
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(steps):
            for name, trainer in trainers.items():
                start = time.process_time()
                trainer.train_step()
                times[name].append(time.process_time() - start)
    base = statistics.median(times["L1, same model (tiny)"])
    lines = [f"### `Trainer.train_step` of `--preset demo`, {steps} steps each after the first, "
             "interleaved", "",
             "| objective | median CPU ms | mean CPU ms | / L1 (same model) |", "|---|---|---|---|"]
    for name, values in times.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med * 1e3:.1f} | {statistics.mean(values) * 1e3:.1f} | {med / base:.2f} |")
    return lines + ["", "The mean includes the steps that measure the CPR/L1 gradient ratio "
                        "(`health.grad_ratio_every`: two extra backward passes).", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", action="store_true", help="also time loop_cpl_step")
    parser.add_argument("--per-step", type=int, action="append", default=[],
                        help="also time the fast step with negatives_per_step=R")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--levers", action="store_true", help="also time the layout alternatives")
    parser.add_argument("--trainer-steps", type=int, default=0)
    parser.add_argument("--no-parts", action="store_true",
                        help="skip the per-case parts (with --trainer-steps: time the trainers only)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_step = tuple(args.per_step)
    lines = ["# CPR step breakdown", "",
             f"- device: {cpu_model()}, 1 thread (`torch.set_num_threads(1)`); {os.cpu_count()} cores",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- torch {torch.__version__}",
             f"- command: `python bench/cpr_step_breakdown.py {' '.join(sys.argv[1:])}`",
             f"- /proc/loadavg at the start: {loadavg()}", ""]
    for case in [] if args.no_parts else args.case or ["demo", "cpl-64-b2"]:
        fns = parts(case, args.loop, per_step, args.levers)
        lines += case_table(case, time_parts(fns, args.rounds), args.rounds)
        if args.profile:
            lines += [f"{case}: top operators of one fast step (self CPU time)", ""]
            lines += profile_lines(fns["fast step"])
        print("\n".join(lines), flush=True)
    if args.trainer_steps:
        lines += trainer_lines(args.trainer_steps, per_step)
    lines += [f"- /proc/loadavg at the end: {loadavg()}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

"""User time, system time and minor page faults of one CPL training step per provider (CPU).

``python bench/step_rusage.py cpl-64-b2 [rounds] [--cpu-caching]`` builds the ``loop``,
``fast_fused`` and ``fast_fused_chunk1`` steps of ``test_cpr_step.py`` for one case in one process,
one after the other, warms each up once, then prints ``resource.getrusage`` deltas of each step. It
separates the step's own compute (user time) from the kernel's work of mapping fresh memory (system
time, minor faults), which wall time and CPU time lump together. ``--cpu-caching`` installs
``cpl_fast.memory``'s caching CPU allocator first. Run it with ``OMP_NUM_THREADS=1``; allocator
settings (``GLIBC_TUNABLES``, ``LD_PRELOAD`` of another malloc) apply as usual.
"""
from __future__ import annotations

import gc
import resource
import sys
import time
from pathlib import Path

import torch

from cpl_fast import memory

sys.path.insert(0, str(Path(__file__).parent))
import test_cpr_step as steps  # noqa: E402

PROVIDERS = ("loop", "fast_fused", "fast_fused_chunk1")


def main(case: str, rounds: int, cpu_caching: bool) -> None:
    if case not in steps.CASES:
        raise SystemExit(f"unknown case {case!r}; choose one of {', '.join(steps.CASES)}")
    if cpu_caching:
        memory.enable_cpu_caching()
    allocator = "caching CPU allocator" if cpu_caching else "system allocator"
    print(f"{case}, {torch.get_num_threads()} thread(s), {rounds} round(s), {allocator}")
    for provider in PROVIDERS:
        # One provider at a time, its warm-up first: a cache filled by another provider's
        # block sizes would measure that provider's leftovers, not this one.
        step = steps.make_train_step(case, provider)[0]
        step()
        for _ in range(rounds):
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            after = resource.getrusage(resource.RUSAGE_SELF)
            print(f"{provider:18s} wall {time.perf_counter() - started:6.2f} s  "
                  f"user {after.ru_utime - before.ru_utime:6.2f} s  "
                  f"sys {after.ru_stime - before.ru_stime:5.2f} s  "
                  f"minor faults {after.ru_minflt - before.ru_minflt}", flush=True)
        del step
        gc.collect()
        if cpu_caching:
            memory.empty_cpu_cache()


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    unknown = set(flags) - {"--cpu-caching"}
    if unknown:
        raise SystemExit(f"unknown option(s) {', '.join(sorted(unknown))}; the only option is --cpu-caching")
    main(args[0] if args else "cpl-64-b2", int(args[1]) if len(args) > 1 else 1, "--cpu-caching" in flags)

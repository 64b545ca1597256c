"""User time, system time and minor page faults of one CPL training step per provider (CPU).

``python bench/step_rusage.py cpl-64-b2 [rounds]`` builds the ``loop``, ``fast_fused`` and
``fast_fused_chunk1`` steps of ``test_cpr_step.py`` for one case in one process, warms each up once,
then prints ``resource.getrusage`` deltas of each step. It separates the step's own compute (user
time) from the kernel's work of mapping fresh memory (system time, minor faults), which wall time
and CPU time lump together. Run it with ``OMP_NUM_THREADS=1``; allocator settings (``GLIBC_TUNABLES``,
``LD_PRELOAD`` of another malloc) apply as usual.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_cpr_step as steps  # noqa: E402

PROVIDERS = ("loop", "fast_fused", "fast_fused_chunk1")


def main(case: str, rounds: int) -> None:
    if case not in steps.CASES:
        raise SystemExit(f"unknown case {case!r}; choose one of {', '.join(steps.CASES)}")
    made = {provider: steps.make_train_step(case, provider)[0] for provider in PROVIDERS}
    for step in made.values():
        step()
    print(f"{case}, {torch.get_num_threads()} thread(s), {rounds} round(s)")
    for _ in range(rounds):
        for provider, step in made.items():
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            after = resource.getrusage(resource.RUSAGE_SELF)
            print(f"{provider:18s} wall {time.perf_counter() - started:6.2f} s  "
                  f"user {after.ru_utime - before.ru_utime:6.2f} s  "
                  f"sys {after.ru_stime - before.ru_stime:5.2f} s  "
                  f"minor faults {after.ru_minflt - before.ru_minflt}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpl-64-b2", int(sys.argv[2]) if len(sys.argv) > 2 else 1)

"""Settings of the tiny training runs several test files start (a few steps, no logs or reports)."""
from __future__ import annotations

TINY_RUN = ["objective=l1", "data.crop=32", "data.batch=2", "train.iterations=2", "checkpoint.every=1",
            "logging.progress=false", "logging.tensorboard=false", "eval.before_after=false",
            "report.enabled=false", "baselines={}", "threads=1", "data.num_workers=0"]


def as_sets(settings: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [item for s in settings for item in ("--set", s)]

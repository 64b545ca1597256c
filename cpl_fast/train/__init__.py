"""cpl_fast.train: negative samplers and the CPL training steps."""
from cpl_fast.train.fast_step import fast_cpl_step
from cpl_fast.train.literal_step import literal_cpl_step
from cpl_fast.train.loop_step import loop_cpl_step
from cpl_fast.train.samplers import SAMPLERS, MismatchedExperts, NegativeSampler, OtherTask, build_sampler
from cpl_fast.train.step_output import CPLStepOutput

__all__ = [
    "literal_cpl_step", "loop_cpl_step", "fast_cpl_step", "CPLStepOutput",
    "SAMPLERS", "MismatchedExperts", "NegativeSampler", "OtherTask", "build_sampler",
]

from cpl_fast.train.config import ConfigError, load_config  # noqa: E402
from cpl_fast.train.trainer import STEPS, Trainer, l1_step, resolve_objective  # noqa: E402

__all__ += ["ConfigError", "load_config", "STEPS", "Trainer", "l1_step", "resolve_objective"]

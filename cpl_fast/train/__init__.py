"""cpl_fast.train: negative samplers and the CPL training steps."""
from cpl_fast._lazy import lazy_exports

# Imported on first use: a command's --help must not wait for torch.
_MODULES = {
    "cpl_fast.train.steps.fast": ("fast_cpl_step",),
    "cpl_fast.train.steps.literal": ("literal_cpl_step",),
    "cpl_fast.train.steps.loop": ("loop_cpl_step",),
    "cpl_fast.losses.negatives": ("MismatchedExperts", "NegativeSampler", "OtherTask"),
    "cpl_fast.train.steps.output": ("CPLStepOutput",),
    "cpl_fast.config": ("ConfigError", "load_config"),
    "cpl_fast.train.steps": ("STEPS", "l1_step", "resolve_objective"),
    "cpl_fast.train.trainer": ("Trainer",),
}
__all__, __getattr__, __dir__ = lazy_exports(globals(), _MODULES)

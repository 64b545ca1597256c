"""Evaluation and routing analysis: test-set scores, ``cpl-restore`` and ``cpl-analyze``, their commands.

* ``scoring``: per-task scores and routing statistics of a test set;
* ``prompt_gap``: the prompt gap measured on an evaluation set;
* ``restore`` / ``analysis``: the work of ``cpl-restore`` and ``cpl-analyze``; ``cli``: the commands.

The metrics (``cpl_fast.metrics``), inference (``cpl_fast.inference``) and checkpoint loading
(``cpl_fast.runs``) they use live below them, shared with training and export; the names re-exported
here from there are kept for existing code.
"""
from cpl_fast._lazy import lazy_exports

# Imported on first use: a command's --help must not wait for torch.
_MODULES = {
    "cpl_fast.inference.restoration": ("Restoration", "autocast", "check_tiling", "pad_to_multiple",
        "restore_full", "restore_image", "to_rgb"),
    "cpl_fast.metrics.image": ("crop_border", "entropy_bits", "psnr", "quantize", "rgb_to_y", "ssim"),
    "cpl_fast.metrics.protocols": ("DEFAULT_PROTOCOLS", "PROTOCOLS", "Protocol", "average", "get_protocol"),
    "cpl_fast.eval.scoring": ("evaluate", "level_statistics", "scores_table"),
}
__all__, __getattr__, __dir__ = lazy_exports(globals(), _MODULES)

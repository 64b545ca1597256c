"""Evaluation, restoration and routing analysis: metric protocols, padded/tiled inference, CLIs.

* ``metrics``: PSNR, SSIM (scikit-image), BasicSR's Y channel, crop borders, entropy in bits;
* ``protocols``: the named metric protocols (``promptir``, ``basicsr_y``, ``mioir``, ``onerestore``);
* ``inference``: any-size, any-channel, tiled and mixed-precision inference (``restore_image``);
* ``scoring``: per-task scores and routing statistics of a test set;
* ``loading``: checkpoints and run folders to models;
* ``restore`` / ``analysis``: the work of ``cpl-restore`` and ``cpl-analyze``; ``cli``: the commands.
"""
from cpl_fast._lazy import lazy_exports

# Imported on first use: a command's --help must not wait for torch.
_MODULES = {
    "cpl_fast.eval.inference": ("Restoration", "autocast", "check_tiling", "pad_to_multiple",
        "restore_full", "restore_image", "to_rgb"),
    "cpl_fast.eval.metrics": ("crop_border", "entropy_bits", "psnr", "quantize", "rgb_to_y", "ssim"),
    "cpl_fast.eval.protocols": ("DEFAULT_PROTOCOLS", "PROTOCOLS", "Protocol", "get_protocol"),
    "cpl_fast.eval.scoring": ("average", "evaluate", "level_statistics", "scores_table"),
}
__all__, __getattr__, __dir__ = lazy_exports(globals(), _MODULES)

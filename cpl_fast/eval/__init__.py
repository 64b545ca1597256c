"""Evaluation, restoration and routing analysis: metric protocols, padded/tiled inference, CLIs.

* ``metrics``: PSNR, SSIM (scikit-image), BasicSR's Y channel, crop borders, entropy in bits;
* ``protocols``: the named metric protocols (``promptir``, ``basicsr_y``, ``mioir``, ``onerestore``);
* ``inference``: any-size, any-channel, tiled and mixed-precision inference (``restore_image``);
* ``evaluate``: per-task scores and routing statistics of a test set;
* ``loading``: checkpoints and run folders to models;
* ``restore`` / ``analysis``: the work of ``cpl-restore`` and ``cpl-analyze``; ``cli``: the commands.
"""
from cpl_fast.eval.evaluate import average, evaluate, level_statistics, scores_table
from cpl_fast.eval.inference import (
    Restoration,
    autocast,
    check_tiling,
    pad_to_multiple,
    restore_full,
    restore_image,
    to_rgb,
)
from cpl_fast.eval.metrics import crop_border, entropy_bits, psnr, quantize, rgb_to_y, ssim
from cpl_fast.eval.protocols import DEFAULT_PROTOCOLS, PROTOCOLS, Protocol, get_protocol

__all__ = [
    "average", "evaluate", "level_statistics", "scores_table",
    "Restoration", "autocast", "check_tiling", "pad_to_multiple", "restore_full", "restore_image", "to_rgb",
    "crop_border", "entropy_bits", "psnr", "quantize", "rgb_to_y", "ssim",
    "DEFAULT_PROTOCOLS", "PROTOCOLS", "Protocol", "get_protocol",
]

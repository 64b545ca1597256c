"""cpl_fast.metrics: what a restoration and a routing are scored by, shared by training and evaluation.

* ``image``: PSNR, SSIM (scikit-image), BasicSR's Y channel, border crops, entropy in bits;
* ``protocols``: the named metric protocols (``promptir``, ``basicsr_y``, ``mioir``, ``onerestore``) and
  the task average the papers report;
* ``routing``: expert usage, task information, the prompt gap, collapse warnings.
"""
from cpl_fast._lazy import lazy_exports

# Imported on first use: a command's --help must not wait for torch.
_MODULES = {
    "cpl_fast.metrics.image": ("batch_psnr", "crop_border", "entropy_bits", "psnr", "quantize", "rgb_to_y",
        "ssim"),
    "cpl_fast.metrics.protocols": ("DEFAULT_PROTOCOLS", "PROTOCOLS", "Protocol", "average", "get_protocol"),
    "cpl_fast.metrics.routing": ("collapse_warnings", "prompt_gap_db", "routing_health",
        "task_expert_information"),
}
__all__, __getattr__, __dir__ = lazy_exports(globals(), _MODULES)

"""cpl_fast.inference: a model applied to an image of any size: padding to the model's multiple,
tiling with overlap, mixed precision, grey or RGBA inputs (``restore_image``). Shared by evaluation,
``cpl-restore``, training's before/after check and the export runners."""
from cpl_fast._lazy import lazy_exports

# Imported on first use: a command's --help must not wait for torch.
_MODULES = {
    "cpl_fast.inference.options": ("AMP_MODES", "AUTO_TILE", "DEFAULT_OVERLAP"),
    "cpl_fast.inference.restoration": ("Restoration", "autocast", "check_tiling", "is_out_of_memory",
        "model_multiple", "pad_to_multiple", "restore_full", "restore_image", "to_rgb"),
}
__all__, __getattr__, __dir__ = lazy_exports(globals(), _MODULES)

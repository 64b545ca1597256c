"""cpl_fast.runs: the run folder of ``cpl-train``, shared by training, evaluation and export.

* ``layout``: the name of every file and folder a run holds (the one place they are spelled);
* ``folder``: unique names, the writer's lock, no silent overwrite;
* ``checkpoints``: crash-safe checkpoints written and read back without running what they contain;
* ``loading``: a ``--ckpt`` argument (run folder, checkpoint folder or weights file) to the model it
  belongs to.
"""
from cpl_fast._lazy import lazy_exports

# Imported on first use: a command's --help must not wait for torch.
_MODULES = {
    "cpl_fast.runs.folder": ("RunFolderBusy", "RunFolderError", "RunLock", "check_folder_name", "clear_run",
        "create_unique_folder", "holds_run", "remove_if_unused"),
    "cpl_fast.runs.checkpoints": ("CheckpointError", "CheckpointWarning", "NonFiniteWeightsError",
        "UnsafeCheckpointError", "checkpoint_folders", "latest_checkpoint", "load_newest_checkpoint",
        "read_checkpoint", "save_best", "save_checkpoint"),
    "cpl_fast.runs.loading": ("LoadedModel", "load_model", "resolve_weights"),
}
__all__, __getattr__, __dir__ = lazy_exports(globals(), _MODULES)

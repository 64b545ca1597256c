"""cpl_fast.data: image I/O, degradation synthesis, dataset layouts, the embedded dataset, torch datasets.

Arrays are (H, W, 3) float RGB in [0, 1]; tensors are (3, H, W). See the submodules' docstrings.
"""
from cpl_fast._lazy import lazy_exports

# Imported on first use: a command's --help must not wait for torch.
_MODULES = {
    "cpl_fast.data.datasets": ("ArrayPairs", "EvalDataset", "FilePairs", "PairSource", "SampleError",
        "TaskBalancedSampler", "TrainDataset", "augment", "build_task_ids", "crop_to_multiple",
        "sample_seed", "task_family", "worker_init_fn"),
    "cpl_fast.data.degradations": ("DEGRADATIONS", "MIO_TASKS", "PARAMETER_RANGES", "PROMPTIR_SIGMAS",
        "degrade", "make_rng", "synthetic_depth"),
    "cpl_fast.data.embedded": ("EMBEDDED_TASKS", "TASK_IDS", "TRAIN_TASKS", "embedded_pairs", "materialize"),
    "cpl_fast.data.io": ("ImageReadError", "atomic_write_bytes", "read_image", "read_image_array",
        "to_uint8", "write_png"),
    "cpl_fast.data.layouts": ("LAYOUTS", "LayoutError", "Report", "Sample", "load_layout", "scan_layout",
        "verify_layout"),
}
__all__, __getattr__, __dir__ = lazy_exports(globals(), _MODULES)

"""cpl_fast.data: image I/O, degradation synthesis, dataset layouts, the embedded dataset, torch datasets.

Arrays are (H, W, 3) float RGB in [0, 1]; tensors are (3, H, W). See the submodules' docstrings.
"""
from cpl_fast.data.datasets import (
    ArrayPairs,
    EvalDataset,
    FilePairs,
    PairSource,
    SampleError,
    TaskBalancedSampler,
    TrainDataset,
    augment,
    build_task_ids,
    crop_to_multiple,
    sample_seed,
    task_family,
    worker_init_fn,
)
from cpl_fast.data.degradations import (
    DEGRADATIONS,
    MIO_TASKS,
    PARAMETER_RANGES,
    PROMPTIR_SIGMAS,
    degrade,
    make_rng,
    synthetic_depth,
)
from cpl_fast.data.embedded import EMBEDDED_TASKS, TASK_IDS, TRAIN_TASKS, embedded_pairs, materialize
from cpl_fast.data.io import (
    ImageReadError,
    atomic_write_bytes,
    read_image,
    read_image_array,
    to_uint8,
    write_png,
)
from cpl_fast.data.layouts import (
    LAYOUTS,
    LayoutError,
    Report,
    Sample,
    load_layout,
    scan_layout,
    verify_layout,
)

__all__ = [
    "ArrayPairs", "EvalDataset", "FilePairs", "PairSource", "SampleError", "TaskBalancedSampler",
    "TrainDataset", "augment",
    "build_task_ids", "crop_to_multiple", "sample_seed", "task_family", "worker_init_fn",
    "DEGRADATIONS", "MIO_TASKS", "PARAMETER_RANGES", "PROMPTIR_SIGMAS", "degrade", "make_rng",
    "synthetic_depth",
    "EMBEDDED_TASKS", "TASK_IDS", "TRAIN_TASKS", "embedded_pairs", "materialize",
    "ImageReadError", "atomic_write_bytes", "read_image", "read_image_array", "to_uint8", "write_png",
    "LAYOUTS", "LayoutError", "Report", "Sample", "load_layout", "scan_layout", "verify_layout",
]

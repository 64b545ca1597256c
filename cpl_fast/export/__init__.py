"""Deployment: ONNX export of sparse-routing inference, onnxruntime and TensorRT runners.

* ``export_onnx`` / ``cpl-export onnx``: the model's own encoder and decoder with the prompt stage in
  standard ONNX ops (``InferenceGraph``): folded prompt maps as constants for a fixed size, the
  reference mix (``Resize`` + ``Conv``) for dynamic sizes;
* ``build_engine`` / ``cpl-export trt``: TensorRT (or TensorRT-RTX) engines with optimisation profiles;
* ``OnnxRunner`` and ``TensorRTRunner``: pad to the model's multiple, run, crop.

onnx, onnxruntime and TensorRT are optional and imported on use. See docs/EXPORT.md.
"""
from cpl_fast._lazy import lazy_exports

# Imported on first use: a command's --help must not wait for torch.
_MODULES = {
    "cpl_fast.export._deps": ("MissingDependency",),
    "cpl_fast.export.graph": ("InferenceGraph",),
    "cpl_fast.export.onnx_export": ("ExportReport", "export_onnx", "read_metadata"),
    "cpl_fast.export.runners": ("EngineIO", "OnnxRunner", "Runner", "TensorRTRunner"),
    "cpl_fast.export.trt": ("EngineBuild", "OnnxParseError", "Profile", "build_engine", "import_tensorrt",
        "read_build"),
}
__all__, __getattr__, __dir__ = lazy_exports(globals(), _MODULES)

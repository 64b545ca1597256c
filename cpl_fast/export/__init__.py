"""Deployment: ONNX export of sparse-routing inference, onnxruntime and TensorRT runners.

* ``export_onnx`` / ``cpl-export onnx``: the model's own encoder and decoder with the prompt stage in
  standard ONNX ops (``InferenceGraph``): folded prompt maps as constants for a fixed size, the
  reference mix (``Resize`` + ``Conv``) for dynamic sizes;
* ``build_engine`` / ``cpl-export trt``: TensorRT (or TensorRT-RTX) engines with optimisation profiles;
* ``OnnxRunner`` and ``TensorRTRunner``: pad to the model's multiple, run, crop.

onnx, onnxruntime and TensorRT are optional and imported on use. See docs/EXPORT.md.
"""
from cpl_fast.export._deps import MissingDependency
from cpl_fast.export.graph import InferenceGraph
from cpl_fast.export.onnx_export import ExportReport, export_onnx, read_metadata
from cpl_fast.export.runners import EngineIO, OnnxRunner, Runner, TensorRTRunner
from cpl_fast.export.trt import (
    EngineBuild,
    OnnxParseError,
    Profile,
    build_engine,
    import_tensorrt,
    read_build,
)

__all__ = [
    "InferenceGraph", "export_onnx", "ExportReport", "read_metadata", "OnnxRunner", "TensorRTRunner",
    "Runner", "EngineIO", "build_engine", "EngineBuild", "Profile", "OnnxParseError", "import_tensorrt",
    "read_build", "MissingDependency",
]

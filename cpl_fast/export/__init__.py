"""Deployment: ONNX export of sparse-routing inference, onnxruntime and TensorRT runners."""

"""Runners of exported models: pad to the model's multiple, run the graph, crop back.

``OnnxRunner(path)`` (onnxruntime, CPU by default) and ``TensorRTRunner(engine_path)`` (a TensorRT
engine on a CUDA GPU) share one interface::

    restored = runner(image)                           # image (B, 3, H, W) float in [0, 1], any H, W
    restored, routing = runner(image, return_routing=True)   # routing: one Routing per prompt level

Padding (reflect, bottom/right, to ``size_multiple``) and cropping happen here, never inside the
graph. A fixed-size graph accepts only its own padded size and says so otherwise.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path

import torch

from cpl_fast.export._deps import require
from cpl_fast.export.graph import LEVEL_NAMES
from cpl_fast.export.onnx_export import INPUT_NAME, read_metadata
from cpl_fast.export.trt import Profile, TensorInfo, import_tensorrt, logger, read_build
from cpl_fast.inference.restoration import pad_to_multiple
from cpl_fast.models.spm import Routing

OUTPUT_NAME = "restored"


def check_image(image: torch.Tensor, channels: int = 3) -> None:
    """Raise unless ``image`` is a floating ``(B, channels, H, W)`` tensor with B, H, W >= 1."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected an image tensor (B, {channels}, H, W), got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != channels:
        raise ValueError(f"expected an image batch (B, {channels}, H, W), got shape {tuple(image.shape)}")
    if min(image.shape[0], image.shape[2], image.shape[3]) < 1:
        raise ValueError(f"image batch, height and width must be >= 1, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"expected a floating-point image in [0, 1], got {image.dtype}")


class Runner(abc.ABC):
    """The shared part: input checks, padding, cropping, routing outputs.

    Subclasses set ``size_multiple``, ``fixed_size`` (``(H, W)`` or None), ``output_names`` and
    implement ``_run(padded) -> {name: tensor}``.
    """

    size_multiple: int
    fixed_size: tuple[int, int] | None
    output_names: list[str]
    channels = 3

    @property
    def has_routing(self) -> bool:
        return all(f"{level}_indices" in self.output_names for level in LEVEL_NAMES)

    def __call__(self, image: torch.Tensor,
                 return_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        check_image(image, self.channels)
        if return_routing and not self.has_routing:
            raise ValueError(f"{type(self).__name__}: the graph has no routing outputs; export it with "
                             "`cpl-export onnx --routing`")
        padded, (h, w) = pad_to_multiple(image, self.size_multiple)
        if self.fixed_size is not None and tuple(padded.shape[-2:]) != self.fixed_size:
            fh, fw = self.fixed_size
            raise ValueError(f"{type(self).__name__}: this graph was exported for {fh}x{fw} images (after "
                             f"padding to a multiple of {self.size_multiple}); got {h}x{w}, padded to "
                             f"{padded.shape[-2]}x{padded.shape[-1]}. Export with --dynamic or for this size")
        outputs = self._run(padded)
        restored = outputs[OUTPUT_NAME][..., :h, :w]
        if not return_routing:
            return restored
        routing = [Routing(outputs[f"{level}_indices"].long(), outputs[f"{level}_weights"])
                   for level in LEVEL_NAMES]
        return restored, routing

    @abc.abstractmethod
    def _run(self, padded: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph on a padded batch; the outputs by name."""


class OnnxRunner(Runner):
    """An exported ONNX model in onnxruntime (``providers``: CPUExecutionProvider by default).

    Tensors go in as float32 on the CPU and come back as CPU tensors.
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        ort = require("onnxruntime", "export")
        self.path = Path(path)
        meta = read_metadata(self.path)        # FileNotFoundError / ValueError for a bad file
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {self.path} ({type(err).__name__}: {err})") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ValueError(f"{self.path}: expected one input named '{INPUT_NAME}', got "
                             f"{[i.name for i in inputs]}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        if OUTPUT_NAME not in self.output_names:
            raise ValueError(f"{self.path}: no output named '{OUTPUT_NAME}' (outputs: {self.output_names})")
        shape = inputs[0].shape
        self.channels = int(shape[1])
        self.fixed_size = (shape[2], shape[3]) if all(isinstance(d, int) for d in shape[2:]) else None
        if "size_multiple" not in meta:
            raise ValueError(f"{self.path} has no cpl_fast.size_multiple metadata: was it written by "
                             "cpl-export onnx?")
        self.size_multiple = int(meta["size_multiple"])
        self.metadata = meta

    def _run(self, padded: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {INPUT_NAME: padded.detach().to("cpu", torch.float32).contiguous().numpy()}
        values = self.session.run(self.output_names, feed)
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, values)}


# TensorRT DataType names -> torch dtypes (the I/O types an exported graph can have).
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
                 "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8}


def engine_tensors(engine) -> list[TensorInfo]:
    """The I/O tensors of a deserialised engine: names, modes, shapes (-1: dynamic), dtypes."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if "INPUT" in str(engine.get_tensor_mode(name)) else "output"
        tensors.append(TensorInfo(name, mode, tuple(int(d) for d in engine.get_tensor_shape(name)),
                                  engine.get_tensor_dtype(name).name))
    return tensors


class EngineIO:
    """An engine's input, outputs and profile, and the input shapes it accepts (no GPU needed).

    Built from the engine's side file, or from a deserialised engine's own tensors.
    """

    def __init__(self, tensors: list[TensorInfo], profile: Profile | None, source: str) -> None:
        inputs = [t for t in tensors if t.mode == "input"]
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ValueError(f"{source}: expected one input named '{INPUT_NAME}', "
                             f"got {[t.name for t in inputs]}")
        self.tensors, self.profile, self.source = list(tensors), profile, source
        self.input = inputs[0]
        if len(self.input.shape) != 4:
            raise ValueError(f"{source}: the input must be (B, C, H, W), got {self.input.shape}")
        self.channels = self.input.shape[1]
        h, w = self.input.shape[2:]
        self.fixed_size = (h, w) if h > 0 and w > 0 else None
        self.outputs = [t for t in tensors if t.mode == "output"]
        self.output_names = [t.name for t in self.outputs]
        if OUTPUT_NAME not in self.output_names:
            raise ValueError(f"{source}: no output named '{OUTPUT_NAME}' ({self.output_names})")
        unknown = [t for t in tensors if t.dtype not in _TORCH_DTYPES]
        if unknown:
            raise ValueError(f"{source}: I/O tensors of types torch cannot hold: {unknown}")

    def torch_dtype(self, tensor: TensorInfo) -> torch.dtype:
        return _TORCH_DTYPES[tensor.dtype]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise unless the padded input ``shape`` lies in the profile (or equals a static input's)."""
        shape = tuple(shape)
        if self.profile is None:
            if shape != tuple(self.input.shape):
                raise ValueError(f"{self.source}: the engine takes {tuple(self.input.shape)}, got {shape}")
            return
        for i, (low, high) in enumerate(zip(self.profile.min, self.profile.max)):
            if not low <= shape[i] <= high:
                raise ValueError(f"{self.source}: input shape {shape} is outside the engine's profile (min "
                                 f"{self.profile.min}, max {self.profile.max}) in dimension {i}; rebuild "
                                 "with a wider --min/--max")


class TensorRTRunner(Runner):
    """A TensorRT engine written by ``cpl-export trt``, run on a CUDA GPU with torch tensors.

    Construction reads the engine's side file (size multiple, I/O tensors, profile; no GPU needed),
    then deserialises the engine, checks its I/O tensors against the side file and creates an
    execution context: that part needs a CUDA GPU and the TensorRT runtime the engine was built
    with. Each call sets the input shape (dynamic profiles), allocates the outputs as CUDA tensors
    of the engine's dtypes, runs on the current stream and waits for it.
    """

    def __init__(self, engine_path: str | os.PathLike, device: str | torch.device = "cuda",
                 module: str | None = None) -> None:
        self.engine_path = Path(engine_path)
        self.build = read_build(self.engine_path)
        self.size_multiple = self.build.size_multiple
        self._set_io(EngineIO(self.build.tensors, self.build.profile, str(self.engine_path)))
        trt = import_tensorrt(module or self.build.module)
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"TensorRTRunner needs a CUDA GPU (device {device}; "
                               f"torch.cuda.is_available() = {torch.cuda.is_available()}): TensorRT engines "
                               "run only on NVIDIA GPUs. On the CPU, run the ONNX model with OnnxRunner")
        self.device = device
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(logger(trt))
            self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise ValueError(f"{trt.__name__} could not deserialise {self.engine_path}: a corrupt file, "
                                 f"or an engine built by another TensorRT version or for another GPU (it was "
                                 f"built by {self.build.module} {self.build.tensorrt_version})")
            found = engine_tensors(self.engine)
            if [(t.name, t.mode, t.dtype) for t in found] != [(t.name, t.mode, t.dtype)
                                                                 for t in self.io.tensors]:
                raise ValueError(f"{self.engine_path}: the engine's I/O tensors {found} differ from its side "
                                 f"file's {self.io.tensors}")
            self._set_io(EngineIO(found, self.build.profile, str(self.engine_path)))
            self.context = self.engine.create_execution_context()

    def _set_io(self, io: EngineIO) -> None:
        self.io = io
        self.channels, self.fixed_size, self.output_names = io.channels, io.fixed_size, io.output_names

    def _run(self, padded: torch.Tensor) -> dict[str, torch.Tensor]:
        self.io.check_shape(tuple(padded.shape))
        x = padded.to(self.device, self.io.torch_dtype(self.io.input)).contiguous()
        if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise ValueError(f"the engine rejected the input shape {tuple(x.shape)}")
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        outputs = {}
        for t in self.io.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            out = torch.empty(shape, dtype=self.io.torch_dtype(t), device=self.device)
            self.context.set_tensor_address(t.name, out.data_ptr())
            outputs[t.name] = out
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.engine_path} (see the log above)")
        stream.synchronize()
        return outputs

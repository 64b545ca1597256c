"""TensorRT engines from the exported ONNX (``cpl-export trt``), with TensorRT or TensorRT-RTX.

``build_engine(onnx_path, engine_path, ...)`` parses the ONNX with TensorRT's own ``OnnxParser``
(every node must import: no plugins), adds an optimisation profile when the input has dynamic
dimensions (min/opt/max shapes), builds with ``build_serialized_network`` and writes the engine and
a side file ``<engine>.json`` (the model's size multiple, the I/O tensors, the profile, how it was
built) that ``TensorRTRunner`` reads.

Two Python modules provide the same builder API: ``tensorrt`` (TensorRT 10, GPU machines) and
``tensorrt_rtx`` (TensorRT for RTX: its builder runs without a GPU, so the parse/build path is
checked on any machine; its engines are compiled for the GPU when first run). ``module="auto"``
takes ``tensorrt`` when installed, else ``tensorrt_rtx``.

Precision: with ``tensorrt``, ``fp16``/``bf16`` set the builder flags (weakly typed network: layers
may run in the lower precision where TensorRT finds it faster). TensorRT-RTX builds strongly typed
networks only (no precision flags): the precision is the ONNX model's, float32 here.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from cpl_fast.export._deps import MissingDependency, require
from cpl_fast.export.onnx_format import INPUT_NAME, read_metadata

MODULES = ("tensorrt", "tensorrt_rtx")
PRECISIONS = ("fp32", "fp16", "bf16")
_FLAG = {"fp16": "FP16", "bf16": "BF16"}


class OnnxParseError(ValueError):
    """TensorRT's ONNX parser rejected nodes of the model; the message lists them."""


def import_tensorrt(module: str = "auto") -> ModuleType:
    """The TensorRT Python module to build with: ``tensorrt``, ``tensorrt_rtx`` or ``auto``."""
    if module not in ("auto", *MODULES):
        raise ValueError(f"unknown TensorRT module {module!r}; choose auto, {', '.join(MODULES)}")
    if module != "auto":
        return require(module)
    reasons = []
    for name in MODULES:
        try:
            return require(name)
        except MissingDependency as err:
            reasons.append(str(err))
    raise MissingDependency("no TensorRT Python module is installed: " + "; ".join(reasons)
                            + ". `pip install cpl_fast[tensorrt]` needs NVIDIA's package index (the PyPI "
                            "`tensorrt` package downloads the real wheel from it); `cpl_fast[tensorrt-rtx]` "
                            "installs from PyPI alone")


@dataclass
class Profile:
    """Optimisation profile of the ``image`` input: ``(B, C, H, W)`` min <= opt <= max."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass
class TensorInfo:
    name: str
    mode: str                    # input | output
    shape: tuple[int, ...]       # -1: dynamic
    dtype: str                   # TensorRT's DataType name (FLOAT, HALF, INT64, ...)


@dataclass
class EngineBuild:
    """What ``build_engine`` produced (also written, as JSON, to ``<engine>.json``)."""

    engine: str
    onnx: str
    module: str
    tensorrt_version: str
    precision: str
    size_multiple: int
    profile: Profile | None
    tensors: list[TensorInfo]
    layers: int
    build_seconds: float
    engine_bytes: int
    optimization_level: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(f"{engine_path}.json")


def check_profile(onnx_shape: list[int | str], profile: Profile | None, multiple: int) -> Profile | None:
    """Validate ``profile`` against the ONNX input shape (ints fixed, strings dynamic).

    A static input needs no profile (one that disagrees with it is an error); a dynamic input needs
    one. Every shape must have the input's rank, equal its fixed dimensions, satisfy
    ``min <= opt <= max`` per dimension, have positive entries and (H, W) multiples of ``multiple``.
    """
    dynamic = [i for i, d in enumerate(onnx_shape) if not isinstance(d, int) or d < 0]
    if profile is None:
        if dynamic == [0] and len(onnx_shape) > 1:
            # A fixed-size export: only the batch is free; without a profile, build for batch 1.
            fixed = tuple(int(d) for d in onnx_shape[1:])
            return Profile((1, *fixed), (1, *fixed), (1, *fixed))
        if dynamic:
            example = example_profile(onnx_shape, multiple)
            shapes = {"min": example.min, "opt": example.opt, "max": example.max}
            flags = " ".join(f"--{label} {','.join(map(str, shape))}" for label, shape in shapes.items())
            raise ValueError(f"the ONNX input {INPUT_NAME} has dynamic dimensions {onnx_shape}: give --min, "
                             f"--opt and --max shapes (B,C,H,W), e.g. {flags}")
        return None
    rank = len(onnx_shape)
    for label, shape in (("min", profile.min), ("opt", profile.opt), ("max", profile.max)):
        if len(shape) != rank:
            raise ValueError(f"profile {label} shape {shape} has {len(shape)} dimensions, "
                             f"the input has {rank}")
        if any(d < 1 for d in shape):
            raise ValueError(f"profile {label} shape {shape} has a dimension < 1")
        for i, d in enumerate(onnx_shape):
            if i not in dynamic and shape[i] != d:
                raise ValueError(f"profile {label} shape {shape}: dimension {i} is fixed to {d} by the model")
        if rank == 4 and (shape[2] % multiple or shape[3] % multiple):
            raise ValueError(f"profile {label} shape {shape}: H and W must be multiples of {multiple} (the "
                             "runner pads images to that multiple)")
    for i in range(rank):
        if not profile.min[i] <= profile.opt[i] <= profile.max[i]:
            raise ValueError(f"profile shapes are inconsistent in dimension {i}: need min <= opt <= max, got "
                             f"{profile.min[i]}, {profile.opt[i]}, {profile.max[i]}")
    return profile


def example_profile(onnx_shape: list[int | str], multiple: int) -> Profile:
    """A profile the input accepts: its fixed dimensions, batch 1..4, H and W of 8, 32 and 64 multiples."""
    picks = []
    for i, d in enumerate(onnx_shape):
        if isinstance(d, int) and d > 0:
            picks.append((d, d, d))
        elif i == 0:
            picks.append((1, 1, 4))
        elif i == 1:
            picks.append((3, 3, 3))
        else:
            picks.append((8 * multiple, 32 * multiple, 64 * multiple))
    return Profile(*(tuple(p[j] for p in picks) for j in range(3)))


def _onnx_input_shape(onnx_path: Path) -> list[int | str]:
    onnx = require("onnx", "export")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    inputs = [i for i in proto.graph.input if i.name == INPUT_NAME]
    if not inputs:
        raise ValueError(f"{onnx_path} has no input named '{INPUT_NAME}'")
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in inputs[0].type.tensor_type.shape.dim]


_LOGGERS: dict[str, object] = {}


def logger(trt: ModuleType):
    """One logger per TensorRT module (TensorRT keeps the first one it is given anyway)."""
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt.__name__]


def parse_onnx(trt: ModuleType, onnx_path: Path):
    """``(builder, network, parser)`` with the ONNX parsed; OnnxParseError listing rejected nodes."""
    builder = trt.Builder(logger(trt))
    network = builder.create_network(0)     # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"node {err.node()} ({err.node_name() or '?'}, {err.node_operator() or '?'}): "
                          f"{err.desc()}")
        raise OnnxParseError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors))
    plugins = [network.get_layer(i).name for i in range(network.num_layers)
               if "PLUGIN" in str(network.get_layer(i).type)]
    if plugins:
        raise OnnxParseError(f"{onnx_path} needs TensorRT plugins for layers {plugins}")
    return builder, network, parser


def network_tensors(network) -> list[TensorInfo]:
    """The network's inputs and outputs: names, shapes (-1 dynamic) and dtypes."""
    tensors = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            tensors.append(TensorInfo(t.name, mode, tuple(int(d) for d in t.shape), t.dtype.name))
    return tensors


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str = "fp32",
                 profile: Profile | None = None, module: str = "auto", optimization_level: int | None = None,
                 workspace_mib: int | None = None) -> EngineBuild:
    """Parse ``onnx_path``, build a serialised engine, write it and its ``.json`` side file."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    onnx_path = Path(onnx_path)
    meta = read_metadata(onnx_path)        # FileNotFoundError / ValueError for a missing or bad file
    if "size_multiple" not in meta:
        raise ValueError(f"{onnx_path} has no cpl_fast.size_multiple metadata: was it written by "
                         "cpl-export onnx?")
    multiple = int(meta["size_multiple"])
    profile = check_profile(_onnx_input_shape(onnx_path), profile, multiple)
    trt = import_tensorrt(module)
    module_name = trt.__name__
    if precision != "fp32" and not hasattr(trt.BuilderFlag, _FLAG[precision]):
        raise ValueError(f"{module_name} {trt.__version__} has no {precision} builder flag: TensorRT-RTX "
                         "builds strongly typed networks, whose precision is the ONNX model's (float32 "
                         f"here). Build {precision} engines with the `tensorrt` module "
                         "(`pip install cpl_fast[tensorrt]`)")
    start = time.perf_counter()
    builder, network, _parser = parse_onnx(trt, onnx_path)
    config = builder.create_builder_config()
    if precision != "fp32":
        config.set_flag(getattr(trt.BuilderFlag, _FLAG[precision]))
    if optimization_level is not None:
        if not 0 <= optimization_level <= 5:
            raise ValueError(f"optimization level must be 0..5, got {optimization_level}")
        config.builder_optimization_level = optimization_level
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if profile is not None:
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{module_name} could not build an engine from {onnx_path} (see the log above)")
    data = bytes(serialized)
    seconds = time.perf_counter() - start
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(data)
    build = EngineBuild(engine=str(engine_path), onnx=str(onnx_path), module=module_name,
                        tensorrt_version=trt.__version__, precision=precision, size_multiple=multiple,
                        profile=profile, tensors=network_tensors(network), layers=network.num_layers,
                        build_seconds=seconds, engine_bytes=len(data), optimization_level=optimization_level,
                        metadata=meta)
    sidecar_path(engine_path).write_text(build.to_json())
    return build


def read_build(engine_path: str | os.PathLike) -> EngineBuild:
    """The ``.json`` side file of an engine written by ``build_engine``; ValueError when unusable."""
    path = sidecar_path(engine_path)
    if not Path(engine_path).is_file():
        raise FileNotFoundError(f"no such TensorRT engine: {engine_path}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it records the engine's size multiple and I/O tensors "
                                "and is written by cpl-export trt next to the engine")
    try:
        raw = json.loads(path.read_text())
        raw["profile"] = None if raw["profile"] is None else Profile(
            **{key: tuple(value) for key, value in raw["profile"].items()})
        raw["tensors"] = [TensorInfo(**{**t, "shape": tuple(t["shape"])}) for t in raw["tensors"]]
        return EngineBuild(**raw)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an engine description written by cpl-export trt ({err})") from err

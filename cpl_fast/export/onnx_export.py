"""ONNX export of the sparse-routing inference model (``cpl-export onnx``).

``export_onnx(model, path, size=(H, W) | None, opset=18, routing=False)`` traces an
``InferenceGraph`` with ``torch.onnx.export(dynamo=True)`` (``torch.export``, non-strict) and
writes a model of standard ONNX ops only: ``TopK`` (static k), ``GatherND``/``Gather``, ``Resize``
(dynamic sizes), ``Conv``, ``LayerNormalization``, ``MatMul``... The input ``image`` is
``(batch, 3, H, W)``; the batch is always dynamic, H and W are fixed (``size``) or dynamic
multiples of ``size_multiple``. The model's own facts travel in ``metadata_props`` (keys
``cpl_fast.*``) for the runners.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cpl_fast.data.io import check_writable_file
from cpl_fast.export._deps import require
from cpl_fast.export.graph import InferenceGraph, check_size
from cpl_fast.export.onnx_format import (  # noqa: F401 (public names of this module too)
    DEFAULT_OPSET,
    INPUT_NAME,
    MAX_BATCH,
    MAX_SIDE,
    META_PREFIX,
    MIN_OPSET,
    input_description,
    read_metadata,
)
from cpl_fast.models.promptir import SparsePromptIR


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote."""

    path: Path
    size: tuple[int, int] | None
    opset: int
    top_k: int | None
    num_prompts: int
    routing: bool
    outputs: list[str]
    seconds: float
    op_types: dict[str, int]


def max_opset() -> int | None:
    """The newest opset both torch.onnx's exporter and the installed onnx implement (None: unknown)."""
    limits = []
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
        limits.append(int(ONNX_MAX_OPSET))
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    try:
        import onnx
        limits.append(int(onnx.defs.onnx_opset_version()))
    except (ImportError, AttributeError):
        pass
    return min(limits) if limits else None


def check_opset(opset: object) -> int:
    """``opset`` when this exporter can write it; ValueError naming the supported range otherwise."""
    top = max_opset()
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET \
            or (top is not None and opset > top):
        supported = f"{MIN_OPSET} to {top}" if top is not None else f"{MIN_OPSET} or later"
        raise ValueError(f"opset {opset!r} is not supported: this exporter writes opsets {supported} "
                         f"(LayerNormalization needs 17, so nothing is lost at {MIN_OPSET})")
    return opset


def export_onnx(model: SparsePromptIR, path: str | os.PathLike, size: tuple[int, int] | None = None,
                opset: int = DEFAULT_OPSET, routing: bool = False) -> ExportReport:
    """Export ``model``'s inference (its own routing, ``top_k`` experts per level) to ``path``.

    ``size = (H, W)``: a fixed-size graph whose folded prompt maps are constants; ``None``: H and W
    dynamic (bilinear ``Resize`` + ``Conv`` prompt path). ``routing``: add the outputs
    ``prompt{3,2,1}_indices`` (int64) and ``prompt{3,2,1}_weights`` ``(batch, k)``.
    """
    onnx = require("onnx", "export")
    require("onnxscript", "export")
    check_opset(opset)
    check_writable_file(path)
    if not isinstance(model, SparsePromptIR):
        raise TypeError(f"export_onnx: expected a SparsePromptIR, got {type(model).__name__}")
    multiple = model.size_multiple
    if size is not None:
        size = check_size(tuple(size), multiple)
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ValueError(f"export_onnx: export a float32 model (got {param.dtype}); TensorRT lowers the "
                         "precision itself (cpl-export trt --fp16/--bf16)")
    # The graph is traced on the CPU; the copy moves, the caller's model stays where it is.
    graph = InferenceGraph(model, size, return_routing=routing).cpu()
    # Example input: batch 2 (torch.export specialises sizes 0 and 1); the smallest size a dynamic
    # graph accepts is one multiple, an example of 2 multiples keeps the trace general.
    example_hw = size if size is not None else (2 * multiple, 3 * multiple)
    example = torch.rand(2, model.inp_channels, *example_hw)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dims = {0: batch}
    if size is None:
        top = MAX_SIDE // multiple
        dims[2] = multiple * torch.export.Dim("height_blocks", min=1, max=top)
        dims[3] = multiple * torch.export.Dim("width_blocks", min=1, max=top)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # torch.export's own deprecation chatter; real problems raise.
        warnings.simplefilter("ignore", FutureWarning)
        # The routing matrix is built by compare-and-sum (ops._reference.routing_matrix), not
        # scatter_add, so no ScatterElements reaches TensorRT and torch.onnx's own decomposition is
        # the only one the graph needs.
        exported = torch.export.export(graph, (example,), dynamic_shapes={INPUT_NAME: dims}, strict=False)
        program = torch.onnx.export(exported, (example,), dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=graph.output_names(),
                                    optimize=True, verbose=False)
    proto = program.model_proto
    _name_dims(proto, ("batch", "height", "width") if size is None else ("batch",))
    meta = {
        "size_multiple": str(multiple),
        "size": "dynamic" if size is None else f"{size[0]}x{size[1]}",
        "top_k": "all" if model.top_k is None else str(model.top_k),
        "num_prompts": str(model.num_prompts),
        "routing": "1" if routing else "0",
        "prompt": "folded constants" if size is not None else "reference mix, Resize, Conv",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    proto.producer_name = "cpl_fast"
    # Shown by onnxruntime (session.get_modelmeta().description) and Netron: what a plain session needs.
    proto.doc_string = input_description(size, multiple)
    onnx.save_model(proto, str(path))
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(path), full_check=True)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ExportReport(path, size, opset, model.top_k, model.num_prompts, routing, graph.output_names(),
                        seconds, dict(sorted(ops.items())))


def _name_dims(proto, names: tuple[str, ...]) -> None:
    """Name the input's dynamic dims (torch.export calls them s0, 8*s1, ...) everywhere they occur."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    rename = {}
    for dim, name in zip([d for d in dims if d.dim_param], names):
        rename[dim.dim_param] = name
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]

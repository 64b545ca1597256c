"""The exported ONNX model's interface: input name, opsets, shape bounds and the ``cpl_fast.*`` metadata.

Kept apart from the exporter (which needs torch) so that ``cpl-export trt`` and the runners read a
model's metadata without importing torch.
"""
from __future__ import annotations

import os
from pathlib import Path

from cpl_fast.export._deps import require

# torch.onnx's exporter implements opset 18 and later (17, the first with LayerNormalization, can only
# be reached by the ONNX version converter, which has no Split adapter from 18 to 17).
MIN_OPSET = 18
DEFAULT_OPSET = 18
MAX_BATCH = 256
MAX_SIDE = 8192          # largest dynamic H and W the export declares (a torch.export bound, not a limit
                         # of the graph; TensorRT profiles set their own)
INPUT_NAME = "image"
META_PREFIX = "cpl_fast."


def input_description(size: tuple[int, int] | None, multiple: int) -> str:
    """What a plain onnxruntime / TensorRT user must feed the model (also the model's ``doc_string``)."""
    if size is None:
        shape = (f"(B, 3, H, W) float32 RGB in [0, 1] with H and W multiples of {multiple} (other sizes fail "
                 f"inside the graph, e.g. in a Reshape: pad first, reflect-padding to the next multiple of "
                 f"{multiple} and cropping the output as cpl_fast.export.OnnxRunner does)")
    else:
        shape = (f"(B, 3, {size[0]}, {size[1]}) float32 RGB in [0, 1], exactly this size (the folded prompt "
                 f"maps are constants of it); export another size, or --dynamic, for other images")
    return (f"cpl_fast image restoration. Input '{INPUT_NAME}': {shape}. Output: the restored image, "
            f"same shape.")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``cpl_fast.*`` metadata of an exported model (prefix removed); ValueError if unreadable."""
    onnx = require("onnx", "export")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, onnx its own; name the file in any case
        raise ValueError(f"cannot read {path} as an ONNX model ({type(err).__name__}: {err})") from err
    if not proto.graph.node:
        raise ValueError(f"{path} is not an ONNX model (its graph has no nodes)")
    return {entry.key[len(META_PREFIX):]: entry.value for entry in proto.metadata_props
            if entry.key.startswith(META_PREFIX)}

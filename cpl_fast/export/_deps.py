"""Optional dependencies of the export: imported on use, with a message naming what to install."""
from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA_OF = {"onnx": "export", "onnxruntime": "export", "onnxscript": "export",
             "tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx"}


class MissingDependency(ImportError):
    """An optional package the requested export step needs is not installed."""


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise ``MissingDependency`` naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = extra or _EXTRA_OF.get(module, "export")
        raise MissingDependency(f"{module} is not installed ({err}); install it with "
                                f"`pip install cpl_fast[{extra}]`") from err

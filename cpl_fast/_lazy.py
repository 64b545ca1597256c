"""Package attributes imported on first use (PEP 562), so that importing a light submodule (a command's
argument parser, the config) does not import torch through its package's ``__init__``."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(module_globals: dict[str, Any], modules: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for the package of ``module_globals`` whose public
    names ``modules[module]`` live in ``module``. An exported name must not also be a submodule's
    name: importing that submodule would rebind the package attribute to the module."""
    package = module_globals["__name__"]
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        module_globals[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(module_globals) | set(exports))

    return list(exports), __getattr__, __dir__

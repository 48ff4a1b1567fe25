"""Bottom layer: lazy re-exports, so that `import neardup` (and so `neardup --help`) loads no heavy library.

A package lists {name: module}; the first access of a name imports its module (PEP 562 module __getattr__).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> tuple[Callable[[str], Any],
                                                                            Callable[[], list[str]]]:
    """(__getattr__, __dir__) for a package whose `namespace` (its globals()) re-exports `exports` lazily.

    `exports` maps each public name to the module defining it, relative to the package (".store").
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later look-ups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__

"""Backends lowering converted models (installed as ``djpq_compiler.backends``).

They consume the integer IR that ``convert`` produces (:mod:`djpq_compiler.ir`, which also
executes it: the reference semantics every backend is checked against).

``tvm`` (needs the ``tvm`` extra) and
``onnx`` (needs ``onnx``/``onnxruntime``) are imported on first attribute access, so
``djpq.backends.tvm.build(...)`` works without importing TVM at package import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["tvm", "onnx"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

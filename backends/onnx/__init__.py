"""ONNX QDQ export of converted models, runnable in onnxruntime.

Installed as ``djpq_compiler.backends.onnx``. ``onnx`` is imported on first use; verification
needs ``onnxruntime`` (extra ``onnxruntime``); a missing one raises
:class:`~djpq_compiler.errors.MissingExtraError` naming the extra.

Example:
    >>> from djpq_compiler.backends.onnx import export, verify
    >>> export(converted, "model.onnx", (x,))           # opset 21, dynamic batch
    >>> verify(converted, "model.onnx", (x,))["max_lsb"]  # <= 1
"""

from __future__ import annotations

from .export import BATCH_DIM, build_model, export, lower, record_shapes, require_onnx
from .graph import (
    OPSET,
    DimValue,
    Emitter,
    FValue,
    QValue,
    SumValue,
    converter_for,
    register,
    unsupported_nodes,
)
from .verify import verify

__all__ = [
    "BATCH_DIM",
    "OPSET",
    "DimValue",
    "Emitter",
    "FValue",
    "QValue",
    "SumValue",
    "build_model",
    "converter_for",
    "export",
    "lower",
    "record_shapes",
    "register",
    "require_onnx",
    "unsupported_nodes",
    "verify",
]

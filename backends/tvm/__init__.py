"""TVM Relax backend: lower a converted (integer) model and build it for x86, aarch64 or CUDA.

Installed as ``djpq_compiler.backends.tvm``. Importing this package does not import TVM; the
adapter (:mod:`.adapter`, the only module that touches TVM) imports it on first use and raises
:class:`~djpq_compiler.errors.MissingExtraError` naming the ``tvm`` extra when it is absent.

Example:
    >>> from djpq_compiler.backends.tvm import build
    >>> compiled = build(converted, target="x86", example_inputs=(x,))
    >>> y = compiled(x)  # bit-exact with converted(x)
"""

from __future__ import annotations

from . import (  # noqa: F401  (registers the converters)
    converters,
    float_ops,
    passthrough,
    pools,
    shapes,
    transformer_ops,
    window_ops,
)
from .adapter import TVM_VERSION
from .build import TARGETS, CompiledModel, build, compile_cuda_to_ptx, find_nvcc, target_spec
from .emit import (
    FloatValue,
    IntValue,
    Lowering,
    check_supported,
    container_dtype,
    lower,
    register,
    unsupported_nodes,
)
from .tune import TUNABLE_TARGETS, TuningReport, database_exists, tune

__all__ = [
    "TARGETS",
    "TVM_VERSION",
    "CompiledModel",
    "FloatValue",
    "IntValue",
    "Lowering",
    "build",
    "check_supported",
    "compile_cuda_to_ptx",
    "container_dtype",
    "find_nvcc",
    "lower",
    "register",
    "target_spec",
    "TUNABLE_TARGETS",
    "TuningReport",
    "database_exists",
    "tune",
    "unsupported_nodes",
]

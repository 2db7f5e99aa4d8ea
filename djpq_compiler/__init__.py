"""djpq-compiler: Differentiable Joint Pruning and Quantization as a torch.fx graph compiler.

Public API::

    import djpq_compiler as djpq
    report = djpq.bops(model, example_inputs)            # exact BOPs at any stage
    groups = djpq.analyze(model, example_inputs)         # channel dependency groups
    pruned = djpq.prune(model, example_inputs, keep={})  # physically smaller GraphModule
    prepared = djpq.prepare(model, example_inputs, djpq.DJPQConfig())
    loss = task_loss + gamma * djpq.djpq_loss(prepared)
"""

from __future__ import annotations

from djpq_compiler.analysis import AnalysisReport, analyze, prune
from djpq_compiler.bops import BopsReport, BopsRow, bops
from djpq_compiler.config import DJPQConfig, GateSpec, Override, QuantSpec
from djpq_compiler.convert import convert
from djpq_compiler.errors import (
    ArtifactError,
    BackendError,
    CaptureError,
    ConfigError,
    DataError,
    DjpqError,
    DjpqWarning,
    FloatOpsWarning,
    MissingExtraError,
    PlanError,
    PruningError,
    QuantizationError,
    UnsupportedOpError,
)
from djpq_compiler.loss import djpq_loss
from djpq_compiler.modules.fused import set_fused_kernels
from djpq_compiler.prepare import prepare
from djpq_compiler.prepared import (
    check_finite,
    freeze_for_deployment,
    open_gates,
    param_groups,
    set_gates_deterministic,
    set_quantizers,
)
from djpq_compiler.prepared_bops import layer_summary

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "bops",
    "analyze",
    "prune",
    "AnalysisReport",
    "DJPQConfig",
    "QuantSpec",
    "GateSpec",
    "Override",
    "prepare",
    "convert",
    "backends",
    "djpq_loss",
    "param_groups",
    "layer_summary",
    "check_finite",
    "set_quantizers",
    "set_gates_deterministic",
    "open_gates",
    "freeze_for_deployment",
    "set_fused_kernels",
    "BopsReport",
    "BopsRow",
    "DjpqError",
    "CaptureError",
    "ConfigError",
    "DataError",
    "UnsupportedOpError",
    "PruningError",
    "QuantizationError",
    "PlanError",
    "ArtifactError",
    "BackendError",
    "MissingExtraError",
    "DjpqWarning",
    "FloatOpsWarning",
    "save_converted",
    "load_converted",
]


def __getattr__(name: str) -> object:
    """``djpq.backends`` is imported on first use (TVM/ONNX load only when asked for)."""
    if name == "backends":
        import importlib

        return importlib.import_module("djpq_compiler.backends")
    if name in ("save_converted", "load_converted"):  # safe converted-model files (serialize.py)
        from djpq_compiler import serialize

        return getattr(serialize, name)
    raise AttributeError(f"module 'djpq_compiler' has no attribute {name!r}")

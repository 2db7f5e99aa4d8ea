"""``export(converted, path, example_inputs)``: write a converted model as an ONNX QDQ model.

The driver checks the model, records static shapes with one PyTorch run on the example inputs,
lowers every node with its converter (collecting *all* failures into one
:class:`~djpq_compiler.errors.BackendError` before anything is written), builds the model with a
dynamic batch dimension, runs ``onnx.checker`` and writes the file atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from djpq_compiler import records
from djpq_compiler.artifacts import atomic_write
from djpq_compiler.errors import BackendError, MissingExtraError

from ..lowering import lower_nodes
from . import (  # noqa: F401  (registers)
    float_ops,
    integer_ops,
    pool_ops,
    shape_ops,
    transformer_ops,
    window_ops,
)
from .graph import (
    CONVERTERS,
    OPSET,
    PACKAGE,
    Emitter,
    FValue,
    QValue,
    SumValue,
    Value,
    container,
    register,
)

__all__ = ["BATCH_DIM", "export", "lower", "require_onnx"]

#: Name of the symbolic batch dimension of every graph input and output.
BATCH_DIM = "batch"
_IR_VERSION = 10  # the first IR with INT4/UINT4 (onnx 1.16, opset 21)


def require_onnx(runtime: bool = False) -> Any:
    """Import ``onnx`` (and ``onnxruntime`` when ``runtime``), naming the extra if missing."""
    import importlib

    names = ("onnx", "onnxruntime") if runtime else ("onnx",)
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:  # pragma: no cover - exercised only without the extra
            raise MissingExtraError(
                f"'{name}' is required for ONNX export/verification but is not installed: "
                "pip install 'djpq-compiler[onnxruntime]'"
            ) from exc
    return modules[-1]


def _check_converted(gm: Any, example_inputs: Sequence[torch.Tensor]) -> list[fx.Node]:
    if not isinstance(gm, fx.GraphModule) or records.stage(gm) != "converted":
        raise BackendError(
            "ONNX export takes a converted model (a GraphModule carrying a ConvertedRecord), got "
            f"{type(gm).__name__} with stage {records.stage(gm)!r}; run "
            "djpq_compiler.convert.convert(prepared) first")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise BackendError(f"the model has {len(placeholders)} input(s) but "
                           f"{len(example_inputs)} example input(s) were given")
    for node, x in zip(placeholders, example_inputs, strict=True):
        if not torch.is_tensor(x) or x.dtype != torch.float32 or x.ndim == 0:
            raise BackendError(f"{node.format_node()}: example input must be a float32 tensor "
                               f"with a batch dimension, got {getattr(x, 'dtype', type(x))}")
    return placeholders


class _ShapeRecorder(fx.Interpreter):
    """Runs the model once and records every tensor-valued node's shape."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if torch.is_tensor(result):
            self.shapes[n] = tuple(result.shape)
        return result


def record_shapes(gm: fx.GraphModule,
                  example_inputs: Sequence[torch.Tensor]) -> dict[fx.Node, tuple[int, ...]]:
    """Static shape of every tensor-valued node for the example inputs."""
    recorder = _ShapeRecorder(gm)
    with torch.no_grad():  # batch 1 suffices: only the non-batch dims are baked into the file
        recorder.run(*(x[:1] for x in example_inputs))
    return recorder.shapes


@register("placeholder")
def _placeholder(ctx: Emitter, node: fx.Node) -> Value:
    from onnx import TensorProto, helper

    shape: list[str | int] = [BATCH_DIM, *ctx.shape(node)[1:]]
    ctx.inputs.append(helper.make_tensor_value_info(node.name, TensorProto.FLOAT, shape))
    ctx.fresh(node.name)
    return FValue(node.name)


@register("output")
def _output(ctx: Emitter, node: fx.Node) -> Value:
    from onnx import TensorProto, helper

    result, args = ctx.value(node.args[0]), node.args[0]
    items = list(result) if isinstance(result, (tuple, list)) else [result]
    arg_nodes = list(args) if isinstance(args, (tuple, list)) else [args]
    for i, (item, arg) in enumerate(zip(items, arg_nodes, strict=True)):
        name = "output" if len(items) == 1 else f"output_{i}"
        if isinstance(item, SumValue):
            item = ctx.as_qvalue(item, f"{name}/q")
        if isinstance(item, QValue):
            elem = container(item.lo, item.hi)[0]
        elif isinstance(item, FValue):
            elem = TensorProto.FLOAT
        else:
            raise BackendError(f"{node.format_node()}: outputs must be tensors, got {item!r}")
        ctx.nodes.append(helper.make_node("Identity", [item.name], [name], name=name))
        dims: list[str | int] = [BATCH_DIM, *ctx.shape(arg)[1:]]
        ctx.outputs.append(helper.make_tensor_value_info(name, elem, dims))
    return None


def lower(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Emitter:
    """Lower every node; raise one UnsupportedNodesError (a BackendError) listing every node that
    cannot be exported."""
    _check_converted(gm, example_inputs)
    shapes = record_shapes(gm, example_inputs)
    ctx = Emitter(gm, shapes)
    lower_nodes(ctx, CONVERTERS, "ONNX", PACKAGE, note="Nothing was written.")
    return ctx


def _plan_hash(gm: fx.GraphModule) -> tuple[str, str]:
    """``(key, hash)``: the plan hash from ``gm.meta`` if present, else a hash of the keep sets."""
    plan = records.applied_plan(gm)
    if plan is not None:
        return "djpq.plan_hash", plan.hash
    keep = records.converted_record(gm).keep
    text = json.dumps({str(k): sorted(int(i) for i in v) for k, v in keep.items()},
                      sort_keys=True)
    return "djpq.keep_hash", hashlib.sha256(text.encode()).hexdigest()


def _metadata(gm: fx.GraphModule, ctx: Emitter, opset: int) -> dict[str, str]:
    from djpq_compiler import __version__

    key, digest = _plan_hash(gm)
    meta = {"djpq.version": __version__, "djpq.opset": str(opset),
            "djpq.integer": json.dumps(records.converted_record(gm).integer),
            "djpq.layer_bits": json.dumps(ctx.layers, sort_keys=True), key: digest}
    record = records.converted_record(gm)
    if record.integer:
        meta["djpq.lowered_layers"] = json.dumps(record.lowered_layers, sort_keys=True,
                                                 default=str)
    return meta


def _check_opset(model: Any, opset: int) -> None:
    from onnx import TensorProto

    if opset >= OPSET:
        return
    wide = {TensorProto.INT4, TensorProto.UINT4, TensorProto.INT16, TensorProto.UINT16}
    used = sorted({TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer
                   if t.data_type in wide})
    if used:
        raise BackendError(f"opset {opset} has no {'/'.join(used)} QuantizeLinear/"
                           f"DequantizeLinear (needed for <=4-bit weights or >8-bit "
                           f"activations); export with opset >= {OPSET}")


def build_model(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                opset: int = OPSET) -> Any:
    """The checked ``onnx.ModelProto`` of ``gm`` (nothing is written)."""
    onnx = require_onnx()
    from onnx import helper

    if not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise BackendError(f"opset must lie in [13, {onnx.defs.onnx_opset_version()}], "
                           f"got {opset}")
    ctx = lower(gm, example_inputs)
    graph = helper.make_graph(ctx.nodes, type(gm).__name__, ctx.inputs, ctx.outputs,
                              ctx.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="djpq-compiler", ir_version=_IR_VERSION)
    _check_opset(model, opset)
    helper.set_model_props(model, _metadata(gm, ctx, opset))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - an exporter bug
        raise BackendError(f"the exported model fails onnx.checker: {exc}") from exc
    return model


def export(converted: fx.GraphModule, path: str | os.PathLike[str],
           example_inputs: Sequence[torch.Tensor] | torch.Tensor, opset: int = OPSET) -> Path:
    """Export a converted model to an ONNX QDQ file (or a float model if it is float).

    Args:
        converted: Output of ``djpq_compiler.convert.convert(prepared, integer=True|False)``.
        path: Destination ``.onnx`` file; written atomically (temp file + ``os.replace``).
        example_inputs: One float32 tensor per model input; fixes every non-batch dimension.
            The batch dimension (dim 0) is symbolic (``"batch"``) in the file.
        opset: ONNX opset; >= 21 for INT4 weights and 16-bit activations.

    Returns:
        The path written.

    Raises:
        BackendError: The model is not converted, or nodes cannot be exported (all listed, with
            ``node.format_node()``, before anything is written).
        MissingExtraError: ``onnx`` is not installed.
    """
    inputs = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    model = build_model(converted, inputs, opset)
    return atomic_write(path, model.SerializeToString())





"""Shape ops and shape code for the ONNX exporter (besides those in :mod:`.float_ops`).

unbind, squeeze/unsqueeze, expand/expand_as, reshape_as/view_as, swapaxes, tensor indexing
(``x[:, 0]``, ``x[..., 1:3]``), ``x.shape``/``x.ndim``/``x.dim()`` and the Python comparisons and
``torch._assert`` that ``fold_shape_code`` leaves because they depend on the batch size. Like the
other shape ops they move integer codes unchanged (a :class:`~.graph.QValue` keeps its scale and
range). The batch dimension (0) is dynamic in the file: ops that would fix it are refused.
"""

from __future__ import annotations

import builtins
import operator
import weakref
from typing import Any

import numpy as np
import torch
from torch import fx

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import BackendError

from ..common_ops import index_select_plan, plan_slice
from .float_ops import _batch_size, _rewrap, _tensor
from .graph import DimValue, Emitter, FValue, QValue, SumValue, Value, register

__all__ = ["slice_tensor"]



def _axes(ctx: Emitter, node: fx.Node, axes: list[int]) -> str:
    return ctx.const(np.array(axes, np.int64), f"{node.name}/axes")


_BATCH_AXES: weakref.WeakKeyDictionary[Emitter, dict[fx.Node, set[int]]] = \
    weakref.WeakKeyDictionary()


def batch_axes(ctx: Emitter, node: fx.Node) -> set[int]:
    """The dims of ``node``'s value that follow the batch size (dim 0 of the inputs), found by
    one more run of the model at batch 2 (the recorded shapes are at batch 1); cached per export.
    After ``permute(2, 0, ...)`` the batch is not dim 0 any more, and dim 0 may be split."""
    if ctx not in _BATCH_AXES:
        from .export import _ShapeRecorder

        recorder = _ShapeRecorder(ctx.gm)
        with torch.no_grad():
            recorder.run(*[torch.randn((2, *ctx.shape(n)[1:])) for n in ctx.gm.graph.nodes
                           if n.op == "placeholder"])
        _BATCH_AXES[ctx] = {
            n: {i for i, (a, b) in enumerate(zip(shape, recorder.shapes.get(n, shape),
                                                 strict=False)) if a != b}
            for n, shape in ctx.shapes.items()}
    return _BATCH_AXES[ctx].get(node, {0})


def _no_batch(ctx: Emitter, node: fx.Node, axes: list[int], what: str) -> None:
    source = node.args[0]
    batch = batch_axes(ctx, source) if isinstance(source, fx.Node) else {0}
    if batch & set(axes):
        raise BackendError(f"{node.format_node()}: {what} the batch dimension, which is "
                           "dynamic in the exported file, is not exported")


@register(*facts.UNBIND_OP.keys())
def _unbind(ctx: Emitter, node: fx.Node) -> Value:
    """``x.unbind(dim)``: Split into size-1 pieces, each squeezed."""
    from onnx import helper

    x = _tensor(ctx, node)
    shape = ctx.shape(node.args[0])
    dim = int(ctx.arg(node, 1, "dim", 0)) % len(shape)
    _no_batch(ctx, node, [dim], "unbinding")
    outs = [ctx.fresh(f"{node.name}/piece_{i}") for i in range(shape[dim])]
    split = ctx.const(np.ones(shape[dim], np.int64), f"{node.name}/split")
    ctx.nodes.append(helper.make_node("Split", [x.name, split], outs, name=f"{node.name}/split",
                                      axis=dim))
    axes = _axes(ctx, node, [dim])
    return tuple(_rewrap(x, ctx.op("Squeeze", [o, axes], f"{node.name}_{i}"))
                 for i, o in enumerate(outs))


@register(*facts.SQUEEZE_OP.keys())
def _squeeze(ctx: Emitter, node: fx.Node) -> Value:
    """``x.squeeze(dim)``; without ``dim`` every size-1 dim but the batch."""
    x = _tensor(ctx, node)
    shape = ctx.shape(node.args[0])
    dim = ctx.arg(node, 1, "dim", None)
    if dim is None:
        batch = batch_axes(ctx, node.args[0])  # type: ignore[arg-type]
        axes = [i for i, s in enumerate(shape) if s == 1 and i not in batch]
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        axes = [int(d) % len(shape) for d in dims if shape[int(d)] == 1]
        _no_batch(ctx, node, [int(d) % len(shape) for d in dims], "squeezing")
    if not axes:
        return x
    return _rewrap(x, ctx.op("Squeeze", [x.name, _axes(ctx, node, axes)], node.name))


@register(*facts.UNSQUEEZE_OP.keys())
def _unsqueeze(ctx: Emitter, node: fx.Node) -> Value:
    x = _tensor(ctx, node)
    dim = int(ctx.arg(node, 1, "dim", None)) % (len(ctx.shape(node.args[0])) + 1)
    return _rewrap(x, ctx.op("Unsqueeze", [x.name, _axes(ctx, node, [dim])], node.name))


@register(*facts.SWAPAXES_OP.keys())
def _swapaxes(ctx: Emitter, node: fx.Node) -> Value:
    x = _tensor(ctx, node)
    ndim = len(ctx.shape(node.args[0]))
    a, b = (int(ctx.arg(node, i, n, None)) % ndim for i, n in ((1, "axis0"), (2, "axis1")))
    perm = list(range(ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return _rewrap(x, ctx.op("Transpose", [x.name], node.name, perm=perm))


def _other(ctx: Emitter, node: fx.Node) -> QValue | FValue:
    other = ctx.arg(node, 1, "other", None)
    if isinstance(other, SumValue):
        other = ctx.as_qvalue(other, f"{node.name}/other_q")
    if not isinstance(other, (QValue, FValue)):
        raise BackendError(f"{node.format_node()}: expects a tensor to take the shape of")
    return other


@register(torch.Tensor.reshape_as, torch.Tensor.view_as)
def _reshape_as(ctx: Emitter, node: fx.Node) -> Value:
    x, other = _tensor(ctx, node), _other(ctx, node)
    shape = ctx.op("Shape", [other.name], f"{node.name}/shape")
    return _rewrap(x, ctx.op("Reshape", [x.name, shape], node.name))


@register(torch.Tensor.expand_as)
def _expand_as(ctx: Emitter, node: fx.Node) -> Value:
    x, other = _tensor(ctx, node), _other(ctx, node)
    shape = ctx.op("Shape", [other.name], f"{node.name}/shape")
    return _rewrap(x, ctx.op("Expand", [x.name, shape], node.name))


@register(torch.Tensor.expand)
def _expand(ctx: Emitter, node: fx.Node) -> Value:
    """``x.expand(*sizes)``: ONNX Expand broadcasts, so ``-1`` (keep) becomes 1; a batch size
    from ``x.size(0)`` stays dynamic."""
    x = _tensor(ctx, node)
    sizes = [ctx.value(a) for a in node.args[1:]]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    parts: list[str] = []
    static: list[int] = []
    for s in sizes:
        if isinstance(s, DimValue):
            if static:
                parts.append(ctx.const(np.array(static, np.int64), f"{node.name}/dims"))
                static = []
            parts.append(s.name)
        elif isinstance(s, int) and not isinstance(s, bool):
            static.append(1 if s == -1 else int(s))
        else:
            raise BackendError(f"{node.format_node()}: expand needs int or x.size(d) sizes")
    if static:
        parts.append(ctx.const(np.array(static, np.int64), f"{node.name}/dims"))
    shape = parts[0] if len(parts) == 1 else ctx.op("Concat", parts, f"{node.name}/shape", axis=0)
    return _rewrap(x, ctx.op("Expand", [x.name, shape], node.name))


def slice_tensor(ctx: Emitter, node: fx.Node, value: Any, index: Any) -> Value:
    """``x[index]`` for ints, positive-step slices and ``...`` (what: ``plan_slice``; the
    batch dims, dynamic in the file, are taken whole only)."""
    if isinstance(value, SumValue):
        value = ctx.as_qvalue(value, f"{node.name}/x_q")
    if not isinstance(value, (QValue, FValue)):
        raise BackendError(f"{node.format_node()}: cannot index {value!r}")
    batch = batch_axes(ctx, node.args[0]) if isinstance(node.args[0], fx.Node) else {0}
    plan = plan_slice(node, ctx.shape(node.args[0]), index, batch,
                      "which follows the batch size (dynamic in the exported file), is not "
                      "exported")
    name = value.name
    if plan.slices:
        axes, starts, ends, steps = zip(*plan.slices, strict=True)
        consts = [ctx.const(np.array(v, np.int64), f"{node.name}/{k}")
                  for k, v in (("starts", starts), ("ends", ends), ("axes", axes),
                               ("steps", steps))]
        name = ctx.op("Slice", [name, *consts],
                      f"{node.name}/slice" if plan.picks else node.name)
    for i, (axis, at) in enumerate(reversed(plan.picks)):  # last axis first: indices stay valid
        last = i == len(plan.picks) - 1
        name = ctx.op("Gather", [name, ctx.const(np.array(at, np.int64), f"{node.name}/at")],
                      node.name if last else f"{node.name}/gather", axis=axis)
    return _rewrap(value, name)


@register(torch.index_select, torch.Tensor.index_select)
def _index_select(ctx: Emitter, node: fx.Node) -> Value:
    """``index_select(x, dim, index)`` with a constant index (the kept positions of a pruned
    channel selection) as ``Gather``; codes keep their scale and range."""
    value = _tensor(ctx, node)
    dim, at = index_select_plan(ctx, node, ctx.shape(node.args[0]))
    _no_batch(ctx, node, [dim], "index_select along")
    name = ctx.op("Gather", [value.name, ctx.const(at, f"{node.name}/index")], node.name,
                  axis=dim)
    return _rewrap(value, name)


# ------------------------------------------------------------------------------ shape code


@register(builtins.getattr)
def _getattr(ctx: Emitter, node: fx.Node) -> Value:
    """``x.shape`` (dynamic batch, static sizes) and ``x.ndim``."""
    name = node.args[1] if len(node.args) > 1 else None
    shape = ctx.shape(node.args[0])
    if name == "shape":
        return tuple([_batch_size(ctx, node), *shape[1:]])
    if name == "ndim":
        return len(shape)
    raise BackendError(f"{node.format_node()}: only .shape and .ndim of a tensor are exported")


@register(torch.Tensor.dim, torch.Tensor.ndimension)
def _dim(ctx: Emitter, node: fx.Node) -> Value:
    return len(ctx.shape(node.args[0]))


_COMPARE: dict[Any, Any] = {
    op: op for op in (operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                      operator.ge, operator.mod, operator.not_)}


@register(*_COMPARE)
def _compare(ctx: Emitter, node: fx.Node) -> Value:
    """Comparisons (and ``%``, ``not``) of static sizes; a dynamic batch size is refused."""
    args = [ctx.value(a) for a in node.args]
    if not all(isinstance(a, (int, float, bool, tuple)) for a in args):
        raise BackendError(f"{node.format_node()}: {node.target} is exported on static sizes "
                           "only (this one depends on the dynamic batch or a tensor)")
    return _COMPARE[node.target](*args)


@register(torch._assert)
def _assert(ctx: Emitter, node: fx.Node) -> Value:
    """A static assert: dropped when true; false ones and dynamic ones are refused."""
    cond = ctx.value(node.args[0]) if node.args else ctx.value(node.kwargs.get("condition"))
    if not isinstance(cond, (bool, int)):
        raise BackendError(f"{node.format_node()}: asserts on the dynamic batch or on tensor "
                           "values are not exported")
    if not cond:
        raise BackendError(f"{node.format_node()}: the assert fails for the example inputs")
    return None

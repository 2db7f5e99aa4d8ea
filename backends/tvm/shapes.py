"""Shape ops on integer codes (and float values): flatten, view/reshape, size, contiguous,
slicing, permute/transpose, chunk/split/unbind, squeeze/unsqueeze, reshape_as, expand, the shape
code left after ``fold_shape_code`` and tensor attributes (``get_attr``).

Shapes are static (fixed by the example inputs), so ``x.size(0)`` lowers to a Python int and a
``view(x.size(0), -1)`` to a constant-shape reshape. Values keep their range and container.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im

from ..common_ops import index_select_plan, plan_slice
from .emit import FloatValue, IntValue, Lowered, Lowering, container_dtype, register

Tensorish = IntValue | FloatValue


def _tensor_arg(ctx: Lowering, node: fx.Node) -> Tensorish:
    value = ctx.value(node.args[0])
    if not isinstance(value, (IntValue, FloatValue)):
        raise BackendError(f"{node.format_node()}: expects a tensor input, got {value!r}")
    return value


def _rewrap(value: Tensorish, expr: Any) -> Tensorish:
    return IntValue(expr, value.lo, value.hi) if isinstance(value, IntValue) else FloatValue(expr)



@register(torch.flatten, torch.Tensor.flatten)
def convert_flatten(ctx: Lowering, node: fx.Node) -> Lowered:
    """``flatten(x, start_dim=0, end_dim=-1)`` as a static reshape."""
    return _flatten(ctx, node, int(ctx.arg(node, 1, "start_dim", 0)),
                    int(ctx.arg(node, 2, "end_dim", -1)))


@register(nn.Flatten)
def convert_flatten_module(ctx: Lowering, node: fx.Node) -> Lowered:
    """``nn.Flatten(start_dim, end_dim)`` (default 1, -1) as a static reshape."""
    module = ctx.module(node)
    return _flatten(ctx, node, int(module.start_dim), int(module.end_dim))


def _flatten(ctx: Lowering, node: fx.Node, start_dim: int, end_dim: int) -> Lowered:
    x = _tensor_arg(ctx, node)
    shape = ctx.bb.shape(x.expr)
    start = start_dim % max(len(shape), 1)
    end = end_dim % max(len(shape), 1)
    new = shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]
    return _rewrap(x, ctx.bb.reshape(x.expr, new))


def _resolve_shape(node: fx.Node, shape: tuple[int, ...], requested: list[int]) -> list[int]:
    """Replace one ``-1`` in ``requested`` by the inferred size, checking the element count."""
    total = math.prod(shape)
    known = math.prod(s for s in requested if s != -1)
    out = [total // known if s == -1 and known else s for s in requested]
    if requested.count(-1) > 1 or math.prod(out) != total:
        raise BackendError(f"{node.format_node()}: cannot reshape {shape} to {tuple(requested)}")
    return out


@register(*facts.RESHAPE)
def convert_reshape(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.view(*shape)``, ``x.reshape(*shape)``, ``torch.reshape(x, shape)``."""
    x = _tensor_arg(ctx, node)
    args = [ctx.value(a) for a in node.args[1:]] or [ctx.value(node.kwargs.get("shape", ()))]
    requested = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if not all(isinstance(s, int) for s in requested):
        raise BackendError(f"{node.format_node()}: reshape needs static int sizes, got "
                           f"{requested!r}")
    shape = ctx.bb.shape(x.expr)
    return _rewrap(x, ctx.bb.reshape(x.expr, _resolve_shape(node, shape, list(requested))))


@register(torch.Tensor.size)
def convert_size(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.size()`` / ``x.size(d)`` as static Python ints."""
    shape = ctx.bb.shape(_tensor_arg(ctx, node).expr)
    dim = ctx.arg(node, 1, "dim", None)
    return tuple(shape) if dim is None else shape[int(dim)]


@register(torch.Tensor.contiguous)
def convert_contiguous(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.contiguous()`` is the identity."""
    return _tensor_arg(ctx, node)


def slice_tensor(ctx: Lowering, node: fx.Node, value: Any, index: Any) -> Lowered:
    """``x[index]`` for ints, positive-step slices and one ``...`` (what: ``plan_slice``)."""
    if not isinstance(value, (IntValue, FloatValue)):
        raise BackendError(f"{node.format_node()}: cannot index {value!r}")
    plan = plan_slice(node, ctx.bb.shape(value.expr), index)
    cuts = sorted([*plan.slices, *((axis, at, at + 1, 1) for axis, at in plan.picks)])
    if not cuts:
        return value
    axes, begins, ends, steps = (list(column) for column in zip(*cuts, strict=True))
    expr = ctx.bb.strided_slice(value.expr, axes, begins, ends, steps)
    if plan.picks:
        dropped = {axis for axis, _ in plan.picks}
        expr = ctx.bb.reshape(expr, [s for a, s in enumerate(ctx.bb.shape(expr))
                                     if a not in dropped])
    return _rewrap(value, expr)


# ------------------------------------------------------------------------------ layout ops
# Permutes, splits and broadcasts move codes without changing them: an integer value keeps its
# range (and container), so a channel shuffle or the head split of attention stays integer.


def _ints(ctx: Lowering, node: fx.Node, start: int, name: str) -> list[int]:
    """Int arguments from ``start`` on, given as varargs, one sequence, or keyword ``name``."""
    args = [ctx.value(a) for a in node.args[start:]]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    if not args and name in node.kwargs:
        value = ctx.value(node.kwargs[name])
        args = list(value) if isinstance(value, (tuple, list)) else [value]
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise BackendError(f"{node.format_node()}: needs static int {name}, got {args!r}")
    return [int(a) for a in args]


@register(*facts.PERMUTE_OP.keys())
def convert_permute(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.permute(*dims)`` / ``torch.permute(x, dims)``."""
    x = _tensor_arg(ctx, node)
    ndim = len(ctx.bb.shape(x.expr))
    dims = [d % ndim for d in _ints(ctx, node, 1, "dims")]
    if sorted(dims) != list(range(ndim)):
        raise BackendError(f"{node.format_node()}: {dims} is not a permutation of {ndim} dims")
    return _rewrap(x, ctx.bb.permute(x.expr, dims))


@register(*facts.TRANSPOSE_OP.keys(), *facts.SWAPAXES_OP.keys())
def convert_transpose(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.transpose(d0, d1)``: swap two dims."""
    x = _tensor_arg(ctx, node)
    ndim = len(ctx.bb.shape(x.expr))
    d0 = int(ctx.arg(node, 1, "dim0", None)) % ndim
    d1 = int(ctx.arg(node, 2, "dim1", None)) % ndim
    perm = list(range(ndim))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return x if d0 == d1 else _rewrap(x, ctx.bb.permute(x.expr, perm))


def _slice_axis(ctx: Lowering, x: Tensorish, axis: int, begin: int, end: int,
                drop: bool = False) -> Tensorish:
    expr = ctx.bb.strided_slice(x.expr, [axis], [begin], [end], [1])
    if drop:
        shape = ctx.bb.shape(expr)
        expr = ctx.bb.reshape(expr, shape[:axis] + shape[axis + 1:])
    return _rewrap(x, expr)


def split_sizes(node: fx.Node, length: int, request: Any, chunks: bool) -> list[int]:
    """Piece sizes of ``torch.chunk`` (``chunks=True``) or ``torch.split`` along a dim of
    ``length``, with torch's rules (chunk: ``ceil(length / n)`` each, maybe fewer pieces)."""
    if isinstance(request, int) and not isinstance(request, bool) and request > 0:
        step = -(-length // request) if chunks else request
        return [min(step, length - i) for i in range(0, length, step)] or [0]
    if not chunks and isinstance(request, (tuple, list)) and \
            all(isinstance(v, int) for v in request) and sum(request) == length:
        return [int(v) for v in request]
    raise BackendError(f"{node.format_node()}: cannot split a dim of {length} by {request!r}")


def _split(ctx: Lowering, node: fx.Node, chunks: bool) -> Lowered:
    x = _tensor_arg(ctx, node)
    shape = ctx.bb.shape(x.expr)
    request = ctx.arg(node, 1, "chunks" if chunks else "split_size_or_sections", None)
    if request is None and not chunks:
        request = ctx.value(node.kwargs.get("split_size"))
    axis = int(ctx.arg(node, 2, "dim", 0)) % len(shape)
    pieces, begin = [], 0
    for size in split_sizes(node, shape[axis], request, chunks):
        pieces.append(_slice_axis(ctx, x, axis, begin, begin + size))
        begin += size
    return tuple(pieces)


@register(*facts.CHUNK_OP.keys())
def convert_chunk(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.chunk(n, dim)``: a tuple of strided slices."""
    return _split(ctx, node, chunks=True)


@register(*facts.SPLIT_OP.keys())
def convert_split(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.split(size_or_sizes, dim)``: a tuple of strided slices."""
    return _split(ctx, node, chunks=False)


@register(*facts.UNBIND_OP.keys())
def convert_unbind(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.unbind(dim)``: one slice per index, that dim removed."""
    x = _tensor_arg(ctx, node)
    shape = ctx.bb.shape(x.expr)
    axis = int(ctx.arg(node, 1, "dim", 0)) % len(shape)
    return tuple(_slice_axis(ctx, x, axis, i, i + 1, drop=True) for i in range(shape[axis]))


@register(*facts.SQUEEZE_OP.keys())
def convert_squeeze(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.squeeze()`` / ``x.squeeze(dim)`` (dims that are not 1 stay, as in torch)."""
    x = _tensor_arg(ctx, node)
    shape = ctx.bb.shape(x.expr)
    dim = ctx.arg(node, 1, "dim", None)
    dims = range(len(shape)) if dim is None else (
        [dim] if isinstance(dim, int) else list(dim))
    drop = {int(d) % max(len(shape), 1) for d in dims if shape[int(d)] == 1}
    new = [s for i, s in enumerate(shape) if i not in drop]
    return _rewrap(x, ctx.bb.reshape(x.expr, new))


@register(*facts.UNSQUEEZE_OP.keys())
def convert_unsqueeze(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.unsqueeze(dim)``."""
    x = _tensor_arg(ctx, node)
    shape = list(ctx.bb.shape(x.expr))
    dim = int(ctx.arg(node, 1, "dim", None)) % (len(shape) + 1)
    return _rewrap(x, ctx.bb.reshape(x.expr, shape[:dim] + [1] + shape[dim:]))


def _other_shape(ctx: Lowering, node: fx.Node) -> tuple[int, ...]:
    other = ctx.arg(node, 1, "other", None)
    if not isinstance(other, (IntValue, FloatValue)):
        raise BackendError(f"{node.format_node()}: expects a tensor to take the shape of")
    return ctx.bb.shape(other.expr)


@register(torch.Tensor.reshape_as, torch.Tensor.view_as)
def convert_reshape_as(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.reshape_as(y)`` / ``x.view_as(y)``."""
    x = _tensor_arg(ctx, node)
    shape = ctx.bb.shape(x.expr)
    return _rewrap(x, ctx.bb.reshape(x.expr, _resolve_shape(node, shape,
                                                            list(_other_shape(ctx, node)))))


def _broadcast(ctx: Lowering, node: fx.Node, x: Tensorish, sizes: list[int]) -> Lowered:
    shape = ctx.bb.shape(x.expr)
    lead = len(sizes) - len(shape)
    if lead < 0:
        raise BackendError(f"{node.format_node()}: cannot expand {shape} to {sizes}")
    target = [s if s != -1 or i < lead else shape[i - lead] for i, s in enumerate(sizes)]
    if any(s < 0 for s in target):
        raise BackendError(f"{node.format_node()}: -1 in a new leading dim of expand")
    if tuple(target) == shape:
        return x
    return _rewrap(x, ctx.bb.call("broadcast_to", x.expr, tuple(target)))


@register(torch.Tensor.expand)
def convert_expand(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.expand(*sizes)`` (``-1`` keeps a dim) as a broadcast."""
    return _broadcast(ctx, node, _tensor_arg(ctx, node), _ints(ctx, node, 1, "size"))


@register(torch.Tensor.expand_as)
def convert_expand_as(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.expand_as(y)``."""
    return _broadcast(ctx, node, _tensor_arg(ctx, node), list(_other_shape(ctx, node)))


# ------------------------------------------------------------------------------ shape code
# fold_shape_code folds static shape code at convert(); what is left depends on the batch,
# which is static here too (the example inputs fix it), so it evaluates to Python values.


@register(builtins.getattr)
def convert_getattr(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.shape`` / ``x.ndim`` of a tensor value."""
    name = node.args[1] if len(node.args) > 1 else None
    shape = ctx.bb.shape(_tensor_arg(ctx, node).expr)
    if name == "shape":
        return tuple(shape)
    if name == "ndim":
        return len(shape)
    raise BackendError(f"{node.format_node()}: only .shape and .ndim of a tensor are lowered")


@register(torch.Tensor.dim, torch.Tensor.ndimension)
def convert_dim(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.dim()``."""
    return len(ctx.bb.shape(_tensor_arg(ctx, node).expr))


@register(torch.Tensor.numel, torch.numel)
def convert_numel(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.numel()``."""
    return math.prod(ctx.bb.shape(_tensor_arg(ctx, node).expr))


#: Python operators on static sizes. ``add``/``sub``/``mul``/``truediv``/``neg`` are not
#: registered here: they are tensor ops too, whose converters call ``static_arithmetic`` first.
_PY_OPS: dict[Any, Any] = {
    operator.floordiv: operator.floordiv, operator.mod: operator.mod,
    operator.eq: operator.eq, operator.ne: operator.ne, operator.lt: operator.lt,
    operator.le: operator.le, operator.gt: operator.gt, operator.ge: operator.ge,
    operator.not_: operator.not_,
}
_ANY_OPS: dict[Any, Any] = {**_PY_OPS, operator.add: operator.add, operator.sub: operator.sub,
                            operator.mul: operator.mul, operator.truediv: operator.truediv,
                            operator.neg: operator.neg}


def static_arithmetic(ctx: Lowering, node: fx.Node) -> Lowered | None:
    """The Python result of a registered operator on plain numbers/tuples (static sizes), or
    ``None`` when an operand is a tensor value (for tensor converters to fall back on)."""
    fn = _ANY_OPS.get(node.target) if node.op == "call_function" else None
    args = [ctx.value(a) for a in node.args]
    if fn is None or any(isinstance(a, (IntValue, FloatValue)) for a in args):
        return None
    try:
        return fn(*args)
    except Exception as exc:  # TypeError/ZeroDivisionError on odd operands
        raise BackendError(f"{node.format_node()}: {type(exc).__name__}: {exc}") from exc


@register(*_PY_OPS)
def convert_python_operator(ctx: Lowering, node: fx.Node) -> Lowered:
    """``//``, ``%``, comparisons and ``not`` on static sizes."""
    result = static_arithmetic(ctx, node)
    if result is None:
        raise BackendError(f"{node.format_node()}: {node.target} is lowered on static sizes "
                           "only, not on tensors")
    return result


@register(torch._assert)
def convert_assert(ctx: Lowering, node: fx.Node) -> Lowered:
    """A shape assert that is static here: removed when true, refused when false."""
    cond = ctx.value(node.args[0]) if node.args else ctx.value(node.kwargs.get("condition"))
    if isinstance(cond, (IntValue, FloatValue)):
        raise BackendError(f"{node.format_node()}: asserts on tensor values are not lowered")
    if not bool(cond):
        raise BackendError(f"{node.format_node()}: the assert fails for the example inputs "
                           f"({node.args[1] if len(node.args) > 1 else ''!r})")
    return None


@register(torch.index_select, torch.Tensor.index_select)
def convert_index_select(ctx: Lowering, node: fx.Node) -> Lowered:
    """``index_select(x, dim, index)`` with a constant index (the kept positions of a pruned
    channel selection) as ``take``; codes keep their range."""
    x = _tensor_arg(ctx, node)
    dim, at = index_select_plan(ctx, node, ctx.bb.shape(x.expr))
    # positions checked in range above; "clip" keeps even a wrong one inside the tensor
    return _rewrap(x, ctx.bb.call("take", x.expr, ctx.bb.const(at.astype(np.int32), "int32"),
                                  axis=dim, mode="clip"))


@register("get_attr")
def convert_get_attr(ctx: Lowering, node: fx.Node) -> Lowered:
    """A tensor attribute (class token, positional embedding, norm weight) as a constant:
    float tensors as float32, integer tensors as codes in their own range."""
    value: Any = operator.attrgetter(str(node.target))(ctx.gm)
    if not torch.is_tensor(value):
        raise BackendError(f"{node.format_node()}: only tensor attributes are lowered")
    data = value.detach().cpu()
    if data.dtype.is_floating_point:
        return FloatValue(ctx.bb.const(data.float().numpy(), "float32"))
    if data.dtype == torch.bool or data.numel() == 0:
        raise BackendError(f"{node.format_node()}: {data.dtype} attributes are not lowered")
    lo, hi = int(data.min()), int(data.max())
    return IntValue(ctx.bb.const(data.numpy(), container_dtype(lo, hi)), lo, hi)



@register("constant", "constant_codes")
def convert_folded_constant(ctx: Lowering, node: fx.Node) -> Lowered:
    """A tensor computed from model attributes only (e.g. Swin V2's position-bias MLP on its
    coordinate table, MaxViT's bias-table gather), evaluated once by the reference executor
    (``lowering.lower_nodes``): a float32 constant, or integer codes in their container, with
    a ``Quantize``'s range or else the values' own (registered as ``"constant_codes"`` too, so
    every integer boundary is folded: an integer op on constant inputs would reach TVM's
    FoldConstant, which compiles a written x86 kernel for a generic CPU and aborts the
    process); exactly the reference's values."""
    value = ctx.folded[node].detach().cpu()
    if value.is_floating_point():
        return FloatValue(ctx.bb.const(value.float().numpy(), "float32"))
    module = ctx.module(node) if node.op == "call_module" else None
    if isinstance(module, im.Quantize):
        lo, hi = int(module.qmin), int(module.qmax)
    else:
        lo, hi = int(value.min()), int(value.max())
    return IntValue(ctx.bb.const(value.numpy(), container_dtype(lo, hi)), lo, hi)

"""Shape ops on integer codes: flatten, view/reshape, size, contiguous, basic slicing.

Shapes are static (fixed by the example inputs), so ``x.size(0)`` lowers to a Python int and a
``view(x.size(0), -1)`` to a constant-shape reshape. Values keep their range and container.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from djpq_compiler.errors import BackendError

from .emit import FloatValue, IntValue, Lowered, Lowering, register

Tensorish = IntValue | FloatValue


def _tensor_arg(ctx: Lowering, node: fx.Node) -> Tensorish:
    value = ctx.value(node.args[0])
    if not isinstance(value, (IntValue, FloatValue)):
        raise BackendError(f"{node.format_node()}: expects a tensor input, got {value!r}")
    return value


def _rewrap(value: Tensorish, expr: Any) -> Tensorish:
    return IntValue(expr, value.lo, value.hi) if isinstance(value, IntValue) else FloatValue(expr)


def _arg(ctx: Lowering, node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return ctx.value(node.args[index])
    return ctx.value(node.kwargs.get(name, default))


@register(torch.flatten, torch.Tensor.flatten)
def convert_flatten(ctx: Lowering, node: fx.Node) -> Lowered:
    """``flatten(x, start_dim=0, end_dim=-1)`` as a static reshape."""
    return _flatten(ctx, node, int(_arg(ctx, node, 1, "start_dim", 0)),
                    int(_arg(ctx, node, 2, "end_dim", -1)))


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


@register(torch.Tensor.view, torch.Tensor.reshape, torch.reshape)
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
    dim = _arg(ctx, node, 1, "dim", None)
    return tuple(shape) if dim is None else shape[int(dim)]


@register(torch.Tensor.contiguous)
def convert_contiguous(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.contiguous()`` is the identity."""
    return _tensor_arg(ctx, node)


def _append(lists: tuple[list[int], ...], values: tuple[int, ...]) -> None:
    for target, value in zip(lists, values, strict=True):
        target.append(value)


def slice_tensor(ctx: Lowering, node: fx.Node, value: Any, index: Any) -> Lowered:
    """``x[index]`` for ints and step-1/positive-step slices (no ellipsis, None or tensors)."""
    if not isinstance(value, (IntValue, FloatValue)):
        raise BackendError(f"{node.format_node()}: cannot index {value!r}")
    items = index if isinstance(index, tuple) else (index,)
    shape = ctx.bb.shape(value.expr)
    axes: list[int] = []
    begins: list[int] = []
    ends: list[int] = []
    steps: list[int] = []
    dropped: list[int] = []
    for axis, item in enumerate(items):
        if isinstance(item, int):
            start = item % shape[axis]
            _append((axes, begins, ends, steps), (axis, start, start + 1, 1))
            dropped.append(axis)
        elif isinstance(item, slice) and (item.step or 1) > 0:
            start, stop, step = item.indices(shape[axis])
            _append((axes, begins, ends, steps), (axis, start, stop, step))
        else:
            raise BackendError(f"{node.format_node()}: only int and positive-step slice "
                               f"indexing is supported, got {item!r}")
    expr = ctx.bb.strided_slice(value.expr, axes, begins, ends, steps)
    if dropped:
        new = [s for a, s in enumerate(ctx.bb.shape(expr)) if a not in dropped]
        expr = ctx.bb.reshape(expr, new)
    return _rewrap(value, expr)

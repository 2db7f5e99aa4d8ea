"""Float ops (float islands of an integer model; the whole float converted model) and shape ops.

Float ops take and return :class:`~.graph.FValue`. Shape ops (flatten, view/reshape, size,
contiguous, getitem on tuples, ``nn.Identity``) also carry integer codes unchanged: a ``Reshape`` of
a quantized tensor keeps its scale and range, which onnxruntime runs on int8/uint8 directly.
The batch dimension is dynamic: ``x.size(0)`` becomes a ``Shape``/``Gather`` value and reshapes
keep dimension 0 symbolic.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from djpq_compiler.errors import BackendError

from .graph import DimValue, Emitter, FValue, QValue, SumValue, Value, register
from .integer_ops import adaptive_windows, pair

__all__: list[str] = []


def _arg(ctx: Emitter, node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return ctx.value(node.args[index])
    return ctx.value(node.kwargs.get(name, default))


def _float(ctx: Emitter, node: fx.Node) -> str:
    return ctx.real(node, node.args[0])


def _rewrap(value: Any, name: str) -> Value:
    if isinstance(value, QValue):
        return QValue(name, value.scale, value.lo, value.hi)
    return FValue(name)


def _tensor(ctx: Emitter, node: fx.Node) -> QValue | FValue:
    value = ctx.value(node.args[0])
    if isinstance(value, SumValue):
        return ctx.as_qvalue(value, f"{node.name}/x_q")
    if not isinstance(value, (QValue, FValue)):
        raise BackendError(f"{node.format_node()}: expects a tensor input, got {value!r}")
    return value


# ------------------------------------------------------------------------------ graph io


@register("get_attr")
def _get_attr(ctx: Emitter, node: fx.Node) -> Value:
    value = ctx.gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    if not torch.is_tensor(value):
        raise BackendError(f"{node.format_node()}: only tensor attributes are exported")
    return FValue(ctx.const(value.detach().cpu().float().numpy(), node.name))


# ------------------------------------------------------------------------------ layers


@register(nn.Conv2d)
def _conv2d(ctx: Emitter, node: fx.Node) -> Value:
    m = ctx.module(node)
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise BackendError(f"{node.format_node()}: only zero padding with explicit sizes")
    inputs = [_float(ctx, node), ctx.const(m.weight.detach().numpy(), f"{node.name}/weight")]
    if m.bias is not None:
        inputs.append(ctx.const(m.bias.detach().numpy(), f"{node.name}/bias"))
    ph, pw = pair(m.padding)
    return FValue(ctx.op("Conv", inputs, node.name, kernel_shape=list(m.kernel_size),
                         strides=list(pair(m.stride)), pads=[ph, pw, ph, pw],
                         dilations=list(pair(m.dilation)), group=m.groups))


@register(nn.Linear)
def _linear(ctx: Emitter, node: fx.Node) -> Value:
    m = ctx.module(node)
    x = _float(ctx, node)
    weight = m.weight.detach().numpy()
    if len(ctx.shape(node.args[0])) == 2:
        inputs = [x, ctx.const(weight, f"{node.name}/weight")]
        if m.bias is not None:
            inputs.append(ctx.const(m.bias.detach().numpy(), f"{node.name}/bias"))
        return FValue(ctx.op("Gemm", inputs, node.name, transB=1))
    out = ctx.op("MatMul", [x, ctx.const(np.ascontiguousarray(weight.T), f"{node.name}/wt")],
                 f"{node.name}/matmul" if m.bias is not None else node.name)
    if m.bias is None:
        return FValue(out)
    return FValue(ctx.op("Add", [out, ctx.const(m.bias.detach().numpy(), f"{node.name}/b")],
                         node.name))


@register(nn.BatchNorm2d)
def _batch_norm(ctx: Emitter, node: fx.Node) -> Value:
    m = ctx.module(node)
    c = m.num_features
    w = m.weight.detach().numpy() if m.weight is not None else np.ones(c, np.float32)
    b = m.bias.detach().numpy() if m.bias is not None else np.zeros(c, np.float32)
    ins = [_float(ctx, node), ctx.const(w, f"{node.name}/gamma"),
           ctx.const(b, f"{node.name}/beta"),
           ctx.const(m.running_mean.numpy(), f"{node.name}/mean"),
           ctx.const(m.running_var.numpy(), f"{node.name}/var")]
    return FValue(ctx.op("BatchNormalization", ins, node.name, epsilon=float(m.eps)))


# ------------------------------------------------------------------------------ activations


def _clip(ctx: Emitter, node: fx.Node, lo: float, hi: float) -> Value:
    bounds = [ctx.scalar(lo, f"{node.name}/lo"), ctx.scalar(hi, f"{node.name}/hi")]
    return FValue(ctx.op("Clip", [_float(ctx, node), *bounds], node.name))


@register(nn.ReLU, F.relu, torch.relu, torch.Tensor.relu)
def _relu(ctx: Emitter, node: fx.Node) -> Value:
    return FValue(ctx.op("Relu", [_float(ctx, node)], node.name))


@register(nn.ReLU6, F.relu6)
def _relu6(ctx: Emitter, node: fx.Node) -> Value:
    return _clip(ctx, node, 0.0, 6.0)


@register(nn.Hardtanh, F.hardtanh)
def _hardtanh(ctx: Emitter, node: fx.Node) -> Value:
    m = ctx.module(node) if node.op == "call_module" else None
    lo = m.min_val if m is not None else float(_arg(ctx, node, 1, "min_val", -1.0))
    hi = m.max_val if m is not None else float(_arg(ctx, node, 2, "max_val", 1.0))
    return _clip(ctx, node, lo, hi)


@register(nn.Sigmoid, torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid)
def _sigmoid(ctx: Emitter, node: fx.Node) -> Value:
    return FValue(ctx.op("Sigmoid", [_float(ctx, node)], node.name))


@register(nn.Tanh, torch.tanh, torch.Tensor.tanh)
def _tanh(ctx: Emitter, node: fx.Node) -> Value:
    return FValue(ctx.op("Tanh", [_float(ctx, node)], node.name))


_BINARY = {operator.add: "Add", torch.add: "Add", torch.Tensor.add: "Add",
           operator.mul: "Mul", torch.mul: "Mul", torch.Tensor.mul: "Mul",
           operator.sub: "Sub", torch.sub: "Sub", torch.Tensor.sub: "Sub",
           operator.truediv: "Div", torch.div: "Div", torch.Tensor.div: "Div"}


@register(*_BINARY)
def _binary(ctx: Emitter, node: fx.Node) -> Value:
    target: Any = (node.target if node.op == "call_function"
                   else getattr(torch.Tensor, str(node.target)))
    if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
        raise BackendError(f"{node.format_node()}: alpha/rounding_mode are not exported")
    a, b = ctx.real(node, node.args[0]), ctx.real(node, node.args[1])
    return FValue(ctx.op(_BINARY[target], [a, b], node.name))


@register(torch.cat, torch.concat)
def _cat(ctx: Emitter, node: fx.Node) -> Value:
    tensors: Any = node.args[0] if node.args else node.kwargs["tensors"]
    parts = [ctx.real(node, a) for a in tensors]
    dim = int(_arg(ctx, node, 1, "dim", 0))
    return FValue(ctx.op("Concat", parts, node.name, axis=dim % len(ctx.shape(node))))


# ------------------------------------------------------------------------------ pooling


def _pool_module_or_args(ctx: Emitter, node: fx.Node) -> dict[str, Any]:
    if node.op == "call_module":
        m = ctx.module(node)
        return {k: getattr(m, k, d) for k, d in (("kernel_size", None), ("stride", None),
                                                  ("padding", 0), ("dilation", 1),
                                                  ("ceil_mode", False),
                                                  ("count_include_pad", True))}
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    defaults = (None, None, 0, 1, False)
    out = {n: _arg(ctx, node, i + 1, n, d) for i, (n, d) in enumerate(zip(names, defaults,
                                                                          strict=True))}
    out["count_include_pad"] = True
    return out


def _window(p: dict[str, Any]) -> dict[str, Any]:
    kernel = pair(p["kernel_size"])
    stride = p["stride"] if p["stride"] not in (None, (), []) else kernel
    ph, pw = pair(p["padding"])
    return {"kernel_shape": list(kernel), "strides": list(pair(stride)),
            "pads": [ph, pw, ph, pw], "ceil_mode": int(bool(p["ceil_mode"]))}


@register(nn.MaxPool2d, F.max_pool2d)
def _max_pool(ctx: Emitter, node: fx.Node) -> Value:
    p = _pool_module_or_args(ctx, node)
    if p.get("return_indices"):
        raise BackendError(f"{node.format_node()}: return_indices is not exported")
    return FValue(ctx.op("MaxPool", [_float(ctx, node)], node.name, **_window(p),
                         dilations=list(pair(p["dilation"]))))


@register(nn.AvgPool2d, F.avg_pool2d)
def _avg_pool(ctx: Emitter, node: fx.Node) -> Value:
    if node.op == "call_module":
        p = _pool_module_or_args(ctx, node)
        if ctx.module(node).divisor_override is not None:
            raise BackendError(f"{node.format_node()}: divisor_override is not exported")
    else:
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        p = {n: _arg(ctx, node, i + 1, n, d) for i, (n, d) in
             enumerate(zip(names, (None, None, 0, False, True), strict=True))}
    return FValue(ctx.op("AveragePool", [_float(ctx, node)], node.name, **_window(p),
                         count_include_pad=int(bool(p["count_include_pad"]))))


@register(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
def _adaptive_avg_pool(ctx: Emitter, node: fx.Node) -> Value:
    size = (ctx.module(node).output_size if node.op == "call_module"
            else _arg(ctx, node, 1, "output_size", None))
    in_hw = ctx.shape(node.args[0])[2:]
    kernel = adaptive_windows(node, in_hw, size)
    if tuple(kernel) == tuple(in_hw):
        return FValue(ctx.op("GlobalAveragePool", [_float(ctx, node)], node.name))
    return FValue(ctx.op("AveragePool", [_float(ctx, node)], node.name,
                         kernel_shape=list(kernel), strides=list(kernel)))


# ------------------------------------------------------------------------------ shape ops


@register(nn.Identity, nn.Dropout, torch.Tensor.contiguous, F.dropout)
def _identity(ctx: Emitter, node: fx.Node) -> Value:
    return _tensor(ctx, node)


def _reshape(ctx: Emitter, node: fx.Node, x: QValue | FValue, dims: list[Any]) -> Value:
    """Reshape to ``dims`` (ints, -1, or dynamic :class:`DimValue`); static dim 0 of the output
    that equals the input's batch is kept symbolic (``0`` = copy) when the batch is preserved."""
    parts: list[str] = []
    static: list[int] = []
    for d in dims:
        if isinstance(d, DimValue):
            if static:
                parts.append(ctx.const(np.array(static, np.int64), f"{node.name}/dims"))
                static = []
            parts.append(d.name)
        else:
            static.append(int(d))
    if static:
        parts.append(ctx.const(np.array(static, np.int64), f"{node.name}/dims"))
    shape = parts[0] if len(parts) == 1 else ctx.op("Concat", parts, f"{node.name}/shape", axis=0)
    return _rewrap(x, ctx.op("Reshape", [x.name, shape], node.name))


@register(torch.flatten, torch.Tensor.flatten, nn.Flatten)
def _flatten(ctx: Emitter, node: fx.Node) -> Value:
    x = _tensor(ctx, node)
    shape = ctx.shape(node.args[0])
    if node.op == "call_module":
        m = ctx.module(node)
        start, end = m.start_dim, m.end_dim
    else:
        start, end = int(_arg(ctx, node, 1, "start_dim", 0)), int(_arg(ctx, node, 2, "end_dim", -1))
    start, end = start % len(shape), end % len(shape)
    dims = [0] * start + [-1] + list(shape[end + 1:])  # 0 copies the (dynamic) leading dims
    return _reshape(ctx, node, x, dims)


@register(torch.Tensor.view, torch.Tensor.reshape, torch.reshape)
def _view(ctx: Emitter, node: fx.Node) -> Value:
    x = _tensor(ctx, node)
    args = [ctx.value(a) for a in node.args[1:]] or [ctx.value(node.kwargs.get("shape", ()))]
    dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if not all(isinstance(d, (int, DimValue)) for d in dims):
        raise BackendError(f"{node.format_node()}: reshape needs int or x.size(d) sizes")
    return _reshape(ctx, node, x, dims)


@register(torch.Tensor.size)
def _size(ctx: Emitter, node: fx.Node) -> Value:
    """``x.size(0)`` is dynamic (batch); other dims are static ints."""
    shape = ctx.shape(node.args[0])
    dim = _arg(ctx, node, 1, "dim", None)
    if dim is not None and int(dim) % len(shape) != 0:
        return shape[int(dim)]
    if dim is None:
        raise BackendError(f"{node.format_node()}: x.size() of a dynamic-batch tensor; use "
                           "x.size(d) with explicit dims")
    full = ctx.op("Shape", [_tensor(ctx, node).name], f"{node.name}/shape")
    return DimValue(ctx.op("Slice", [full, ctx.const(np.array([0], np.int64), f"{node.name}/b"),
                                     ctx.const(np.array([1], np.int64), f"{node.name}/e")],
                           node.name))


@register(operator.getitem)
def _getitem(ctx: Emitter, node: fx.Node) -> Value:
    container, index = ctx.value(node.args[0]), ctx.value(node.args[1])
    if isinstance(container, (tuple, list)):
        return container[index]
    raise BackendError(f"{node.format_node()}: tensor indexing is not exported")

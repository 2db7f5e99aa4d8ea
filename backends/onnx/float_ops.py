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
from torch import fx, nn

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import BackendError
from djpq_compiler.ir.pooling import adaptive_bin_matrix
from djpq_compiler.registry import node_key

from ..common_ops import (
    INFERENCE_IDENTITIES,
    binary_alpha,
    check_inference_identity,
    clamp_bounds,
    cumsum_dim,
    flip_dims,
    rsub_operand,
)
from ..lowering import index_or_slice
from .graph import DimValue, Emitter, FValue, QValue, SumValue, Value, container, register
from .integer_ops import adaptive_windows, pair

__all__: list[str] = []



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
    value = operator.attrgetter(str(node.target))(ctx.gm)
    if not torch.is_tensor(value):
        raise BackendError(f"{node.format_node()}: only tensor attributes are exported")
    return FValue(ctx.const(value.detach().cpu().float().numpy(), node.name))


_NP_CONTAINER = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16}


@register("constant")
def _folded_constant(ctx: Emitter, node: fx.Node) -> Value:
    """A tensor computed from model attributes only, evaluated once by the reference executor
    (``lowering.lower_nodes``): a float32 initializer, or a ``Quantize``'s codes in their
    container (scale and range from the module), behind an ``Identity`` named ``node.name``."""
    from onnx import TensorProto

    value = ctx.folded[node].detach().cpu()
    if value.is_floating_point():
        const = ctx.const(value.float().numpy(), f"{node.name}/value")
        return FValue(ctx.op("Identity", [const], node.name))
    module = ctx.module(node)
    lo, hi = int(module.qmin), int(module.qmax)
    dtype = _NP_CONTAINER[TensorProto.DataType.Name(container(lo, hi)[0])]
    const = ctx.const(value.numpy().astype(dtype), f"{node.name}/value")
    return QValue(ctx.op("Identity", [const], node.name), float(module.scale), lo, hi)


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


@register(*facts.RELU)
def _relu(ctx: Emitter, node: fx.Node) -> Value:
    return FValue(ctx.op("Relu", [_float(ctx, node)], node.name))


@register(*facts.RELU6)
def _relu6(ctx: Emitter, node: fx.Node) -> Value:
    return _clip(ctx, node, 0.0, 6.0)


@register(*facts.HARDTANH_OP.keys())
def _hardtanh(ctx: Emitter, node: fx.Node) -> Value:
    m = ctx.module(node) if node.op == "call_module" else None
    lo = m.min_val if m is not None else float(ctx.arg(node, 1, "min_val", -1.0))
    hi = m.max_val if m is not None else float(ctx.arg(node, 2, "max_val", 1.0))
    return _clip(ctx, node, lo, hi)


@register(*facts.SIGMOID_OP.keys())
def _sigmoid(ctx: Emitter, node: fx.Node) -> Value:
    return FValue(ctx.op("Sigmoid", [_float(ctx, node)], node.name))


@register(*facts.SILU_OP.keys())
def _silu(ctx: Emitter, node: fx.Node) -> Value:
    """``x * sigmoid(x)`` (opset 21 has no SiLU/Swish op)."""
    x = _float(ctx, node)
    return FValue(ctx.op("Mul", [x, ctx.op("Sigmoid", [x], f"{node.name}/sigmoid")], node.name))


def _clamp3(ctx: Emitter, node: fx.Node, x: str) -> str:
    """``min(max(x + 3, 0), 6)`` in float32, as PyTorch's hardsigmoid/hardswish kernels."""
    shifted = ctx.op("Add", [x, ctx.scalar(3.0, f"{node.name}/three")], f"{node.name}/plus3")
    bounds = [ctx.scalar(0.0, f"{node.name}/zero"), ctx.scalar(6.0, f"{node.name}/six")]
    return ctx.op("Clip", [shifted, *bounds], f"{node.name}/clamp")


@register(*facts.HARDSWISH_OP.keys())
def _hardswish(ctx: Emitter, node: fx.Node) -> Value:
    """PyTorch's ``x * clamp(x + 3, 0, 6) / 6`` in its order of operations (bit-exact in
    float32; ONNX ``HardSwish`` computes ``x * clamp(x / 6 + 0.5, 0, 1)``, another rounding)."""
    x = _float(ctx, node)
    prod = ctx.op("Mul", [x, _clamp3(ctx, node, x)], f"{node.name}/mul")
    return FValue(ctx.op("Div", [prod, ctx.scalar(6.0, f"{node.name}/div6")], node.name))


@register(*facts.HARDSIGMOID_OP.keys())
def _hardsigmoid(ctx: Emitter, node: fx.Node) -> Value:
    """PyTorch's ``clamp(x + 3, 0, 6) / 6`` in its order of operations (bit-exact in float32)."""
    clamped = _clamp3(ctx, node, _float(ctx, node))
    return FValue(ctx.op("Div", [clamped, ctx.scalar(6.0, f"{node.name}/div6")], node.name))


@register(*facts.GELU_OP.keys())
def _gelu(ctx: Emitter, node: fx.Node) -> Value:
    m = ctx.module(node) if node.op == "call_module" else None
    approximate = m.approximate if m is not None else str(node.kwargs.get("approximate", "none"))
    return FValue(ctx.op("Gelu", [_float(ctx, node)], node.name, approximate=approximate))


@register(*facts.TANH_OP.keys())
def _tanh(ctx: Emitter, node: fx.Node) -> Value:
    return FValue(ctx.op("Tanh", [_float(ctx, node)], node.name))


_ONNX_BINARY = {"add": "Add", "subtract": "Sub", "multiply": "Mul", "divide": "Div"}
#: Each binary op's registry key -> its name (``"add"``, ...), as ``lookup.BINARY_OPS`` has it.
_BINARY_NAMES = facts.name_table(facts.ELEMENTWISE_BINARY)
_BINARY = {key: _ONNX_BINARY[name] for key, name in _BINARY_NAMES.items()}


@register(*_BINARY)
def _binary(ctx: Emitter, node: fx.Node) -> Value:
    target: Any = node_key(ctx.gm, node)
    alpha = binary_alpha(node, _BINARY_NAMES[target])
    static = _static_arithmetic(ctx, node, target) if alpha == 1 else None
    if static is not None:
        return static
    a, b = ctx.real(node, node.args[0]), ctx.real(node, node.args[1])
    if alpha != 1:  # a + alpha * b, the product rounded to float32 first
        b = ctx.op("Mul", [b, ctx.scalar(alpha, f"{node.name}/alpha")], f"{node.name}/scaled")
    return FValue(ctx.op(_BINARY[target], [a, b], node.name))


_INT_ARITHMETIC = {operator.add: operator.add, operator.sub: operator.sub,
                   operator.mul: operator.mul, operator.floordiv: operator.floordiv,
                   operator.truediv: operator.truediv}


def _static_arithmetic(ctx: Emitter, node: fx.Node, target: Any) -> Any:
    """Python arithmetic on static sizes (``channels // 2`` of a shuffle): computed here."""
    if node.op != "call_function" or target not in _INT_ARITHMETIC or len(node.args) != 2:
        return None
    a, b = ctx.value(node.args[0]), ctx.value(node.args[1])
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return _INT_ARITHMETIC[target](a, b)
    return None


@register(operator.floordiv)
def _floordiv(ctx: Emitter, node: fx.Node) -> Value:
    static = _static_arithmetic(ctx, node, operator.floordiv)
    if static is None:
        raise BackendError(f"{node.format_node()}: floor division is exported on static sizes "
                           "only")
    return static


@register(torch.mean, torch.Tensor.mean)
def _mean(ctx: Emitter, node: fx.Node) -> Value:
    """``x.mean(dims, keepdim)`` as ReduceMean (axes as an input, opset >= 18)."""
    ndim = len(ctx.shape(node.args[0]))
    dims = ctx.arg(node, 1, "dim", None)
    dims = list(range(ndim)) if dims is None else (
        [dims] if isinstance(dims, int) else list(dims))
    if not all(isinstance(d, int) for d in dims) or any(d % ndim == 0 for d in dims):
        raise BackendError(f"{node.format_node()}: mean over static non-batch dims only")
    keep = bool(ctx.arg(node, 2, "keepdim", False))
    axes = ctx.const(np.array([d % ndim for d in dims], np.int64), f"{node.name}/axes")
    return FValue(ctx.op("ReduceMean", [_float(ctx, node), axes], node.name,
                         keepdims=int(keep)))


@register(torch.rsub)
def _rsub(ctx: Emitter, node: fx.Node) -> Value:
    """``torch.rsub(x, other)`` = ``other - x`` on floats as Sub."""
    return FValue(ctx.op("Sub", [ctx.real(node, rsub_operand(node)), _float(ctx, node)],
                         node.name))


@register(torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip)
def _clamp(ctx: Emitter, node: fx.Node) -> Value:
    """``x.clamp(min, max)`` on floats with number bounds as Max then Min (PyTorch's order:
    ``max`` wins where ``min > max``)."""
    lo, hi = clamp_bounds(node, lambda b: b)
    name = _float(ctx, node)
    if lo is not None:
        name = ctx.op("Max", [name, ctx.scalar(float(lo), f"{node.name}/min_value")],
                      node.name if hi is None else f"{node.name}/lower")
    if hi is not None:
        name = ctx.op("Min", [name, ctx.scalar(float(hi), f"{node.name}/max_value")],
                      node.name)
    return FValue(name)


@register(torch.cumsum, torch.Tensor.cumsum)
def _cumsum(ctx: Emitter, node: fx.Node) -> Value:
    """``torch.cumsum(x, dim)`` on floats as CumSum (not along the dynamic batch dim)."""
    dim = cumsum_dim(node, len(ctx.shape(node.args[0])))
    if dim == 0:
        raise BackendError(f"{node.format_node()}: cumsum along the batch dim is not exported")
    axis = ctx.const(np.array(dim, np.int64), f"{node.name}/axis")
    return FValue(ctx.op("CumSum", [_float(ctx, node), axis], node.name))


@register(torch.flip, torch.Tensor.flip)
def _flip(ctx: Emitter, node: fx.Node) -> Value:
    """``torch.flip(x, dims)`` on floats as one Slice with step -1 on each dim."""
    dims = flip_dims(node, len(ctx.shape(node.args[0])))
    if 0 in dims:
        raise BackendError(f"{node.format_node()}: flip of the batch dim is not exported")
    lowest = np.iinfo(np.int64).min
    consts = [ctx.const(np.array(v, np.int64), f"{node.name}/{k}")
              for k, v in (("starts", [-1] * len(dims)), ("ends", [lowest] * len(dims)),
                           ("axes", dims), ("steps", [-1] * len(dims)))]
    return FValue(ctx.op("Slice", [_float(ctx, node), *consts], node.name))


@register(*facts.CONCAT)
def _cat(ctx: Emitter, node: fx.Node) -> Value:
    tensors: Any = node.args[0] if node.args else node.kwargs["tensors"]
    parts = [ctx.real(node, a) for a in tensors]
    dim = int(ctx.arg(node, 1, "dim", 0))
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
    out = {n: ctx.arg(node, i + 1, n, d) for i, (n, d) in enumerate(zip(names, defaults,
                                                                          strict=True))}
    out["count_include_pad"] = True
    return out


def _window(p: dict[str, Any]) -> dict[str, Any]:
    kernel = pair(p["kernel_size"])
    stride = p["stride"] if p["stride"] not in (None, (), []) else kernel
    ph, pw = pair(p["padding"])
    return {"kernel_shape": list(kernel), "strides": list(pair(stride)),
            "pads": [ph, pw, ph, pw], "ceil_mode": int(bool(p["ceil_mode"]))}


@register(*facts.MAX_POOL2D_OP.keys())
def _max_pool(ctx: Emitter, node: fx.Node) -> Value:
    p = _pool_module_or_args(ctx, node)
    if p.get("return_indices"):
        raise BackendError(f"{node.format_node()}: return_indices is not exported")
    return FValue(ctx.op("MaxPool", [_float(ctx, node)], node.name, **_window(p),
                         dilations=list(pair(p["dilation"]))))


@register(*facts.AVG_POOL2D_OP.keys())
def _avg_pool(ctx: Emitter, node: fx.Node) -> Value:
    if node.op == "call_module":
        p = _pool_module_or_args(ctx, node)
        if ctx.module(node).divisor_override is not None:
            raise BackendError(f"{node.format_node()}: divisor_override is not exported")
    else:
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        p = {n: ctx.arg(node, i + 1, n, d) for i, (n, d) in
             enumerate(zip(names, (None, None, 0, False, True), strict=True))}
    return FValue(ctx.op("AveragePool", [_float(ctx, node)], node.name, **_window(p),
                         count_include_pad=int(bool(p["count_include_pad"]))))


@register(*facts.ADAPTIVE_AVG_POOL2D_OP.keys())
def _adaptive_avg_pool(ctx: Emitter, node: fx.Node) -> Value:
    """Float adaptive average pool: ``GlobalAveragePool``/``AveragePool`` for equal bins, else
    torch's (overlapping) bins as 0/1 matrices, ``B_h @ x @ B_w^T`` divided by each bin's size."""
    size = (ctx.module(node).output_size if node.op == "call_module"
            else ctx.arg(node, 1, "output_size", None))
    in_hw = ctx.shape(node.args[0])[2:]
    try:
        kernel = adaptive_windows(node, in_hw, size)
    except BackendError:  # unequal bins
        return _adaptive_bins(ctx, node, in_hw, size)
    if tuple(kernel) == tuple(in_hw):
        return FValue(ctx.op("GlobalAveragePool", [_float(ctx, node)], node.name))
    return FValue(ctx.op("AveragePool", [_float(ctx, node)], node.name,
                         kernel_shape=list(kernel), strides=list(kernel)))


def _adaptive_bins(ctx: Emitter, node: fx.Node, in_hw: tuple[int, ...], size: Any) -> Value:
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    out_h, out_w = (in_hw[i] if s is None else int(s) for i, s in enumerate(sizes))
    bins_h = adaptive_bin_matrix(in_hw[0], out_h).numpy().astype(np.float32)
    bins_w = adaptive_bin_matrix(in_hw[1], out_w).numpy().astype(np.float32)
    rows = ctx.op("MatMul", [_float(ctx, node), ctx.const(bins_w.T.copy(), f"{node.name}/bins_w")],
                  f"{node.name}/rows")
    sums = ctx.op("MatMul", [ctx.const(bins_h, f"{node.name}/bins_h"), rows], f"{node.name}/sums")
    counts = (bins_h.sum(axis=1)[:, None] * bins_w.sum(axis=1)[None, :]).astype(np.float32)
    return FValue(ctx.op("Div", [sums, ctx.const(counts, f"{node.name}/counts")], node.name))


# ------------------------------------------------------------------------------ shape ops


@register(nn.Identity, torch.Tensor.contiguous)
def _identity(ctx: Emitter, node: fx.Node) -> Value:
    return _tensor(ctx, node)


@register(*INFERENCE_IDENTITIES)
def _inference_identity(ctx: Emitter, node: fx.Node) -> Value:
    """Dropout (every form) and stochastic depth: the identity in eval mode (or with
    ``p == 0``); training mode is refused (``backends/common_ops.py``)."""
    check_inference_identity(ctx, node)
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


@register(*facts.FLATTEN_OP.keys())
def _flatten(ctx: Emitter, node: fx.Node) -> Value:
    x = _tensor(ctx, node)
    shape = ctx.shape(node.args[0])
    if node.op == "call_module":
        m = ctx.module(node)
        start, end = m.start_dim, m.end_dim
    else:
        start, end = int(ctx.arg(node, 1, "start_dim", 0)), int(ctx.arg(node, 2, "end_dim", -1))
    start, end = start % len(shape), end % len(shape)
    dims = [0] * start + [-1] + list(shape[end + 1:])  # 0 copies the (dynamic) leading dims
    return _reshape(ctx, node, x, dims)


@register(*facts.RESHAPE)
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
    dim = ctx.arg(node, 1, "dim", None)
    if dim is not None and int(dim) % len(shape) != 0:
        return shape[int(dim)]
    if dim is None:  # (dynamic batch, static sizes...), unpacked by getitem or passed to view
        batch = _batch_size(ctx, node)
        return tuple([batch, *shape[1:]])
    return _batch_size(ctx, node)


def _batch_size(ctx: Emitter, node: fx.Node) -> DimValue:
    """``x.size(0)`` as a dynamic ``int64[1]``."""
    full = ctx.op("Shape", [_tensor(ctx, node).name], f"{node.name}/shape")
    return DimValue(ctx.op("Slice", [full, ctx.const(np.array([0], np.int64), f"{node.name}/b"),
                                     ctx.const(np.array([1], np.int64), f"{node.name}/e")],
                           node.name))


def _dims(ctx: Emitter, node: fx.Node, start: int) -> list[int]:
    args = [ctx.value(a) for a in node.args[start:]]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    if not args and "dims" in node.kwargs:
        args = list(ctx.value(node.kwargs["dims"]))
    if not all(isinstance(d, int) for d in args):
        raise BackendError(f"{node.format_node()}: dimensions must be static ints")
    return [int(d) for d in args]


@register(*facts.TRANSPOSE_OP.keys())
def _transpose(ctx: Emitter, node: fx.Node) -> Value:
    """A transpose of two dims (codes keep their scale: a channel shuffle stays integer)."""
    x = _tensor(ctx, node)
    ndim = len(ctx.shape(node.args[0]))
    a, b = (d % ndim for d in _dims(ctx, node, 1))
    perm = list(range(ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return _rewrap(x, ctx.op("Transpose", [x.name], node.name, perm=perm))


@register(*facts.PERMUTE_OP.keys())
def _permute(ctx: Emitter, node: fx.Node) -> Value:
    x = _tensor(ctx, node)
    ndim = len(ctx.shape(node.args[0]))
    perm = [d % ndim for d in _dims(ctx, node, 1)]
    return _rewrap(x, ctx.op("Transpose", [x.name], node.name, perm=perm))


def _split_sizes(node: fx.Node, length: int, request: Any, chunks: bool) -> list[int]:
    if chunks:
        step = -(-length // int(request))
        return [min(step, length - i) for i in range(0, length, step)]
    if isinstance(request, int):
        return [min(request, length - i) for i in range(0, length, request)]
    sizes = [int(v) for v in request]
    if sum(sizes) != length:
        raise BackendError(f"{node.format_node()}: split sizes {sizes} do not add up to {length}")
    return sizes


def _split(ctx: Emitter, node: fx.Node, chunks: bool) -> Value:
    x = _tensor(ctx, node)
    shape = ctx.shape(node.args[0])
    request = ctx.arg(node, 1, "chunks" if chunks else "split_size_or_sections", None)
    dim = int(ctx.arg(node, 2, "dim", 0)) % len(shape)
    if dim == 0:
        raise BackendError(f"{node.format_node()}: splitting the (dynamic) batch dimension is "
                           "not exported")
    sizes = _split_sizes(node, shape[dim], request, chunks)
    from onnx import helper

    outs = [ctx.fresh(f"{node.name}_{i}") for i in range(len(sizes))]
    split = ctx.const(np.array(sizes, np.int64), f"{node.name}/split")
    ctx.nodes.append(helper.make_node("Split", [x.name, split], outs, name=node.name, axis=dim))
    return tuple(_rewrap(x, o) for o in outs)


@register(*facts.CHUNK_OP.keys())
def _chunk(ctx: Emitter, node: fx.Node) -> Value:
    return _split(ctx, node, chunks=True)


@register(*facts.SPLIT_OP.keys())
def _split_op(ctx: Emitter, node: fx.Node) -> Value:
    return _split(ctx, node, chunks=False)


@register(operator.getitem)
def _getitem(ctx: Emitter, node: fx.Node) -> Value:
    from .shape_ops import slice_tensor

    return index_or_slice(ctx, node, slice_tensor)

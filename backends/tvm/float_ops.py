"""Float islands and integer lookup tables in Relax.

A converted graph keeps an op in float where it has no integer lowering: it then sits between a
``Dequantize`` and the next ``Quantize`` (``converted_record(gm).float_ops``). Each such op is
emitted here as the same float32 computation the reference executor (PyTorch) runs, in the same
order of operations where that decides the rounding:

* **exact** (IEEE-754 float32 ``+ - * /``, min/max are correctly rounded, so same order = same
  bits): relu, relu6, hardtanh, hardsigmoid ``clip(x + 3, 0, 6) / 6``, hardswish
  ``x * clip(x + 3, 0, 6) / 6``, binary add/sub/mul/div (tensor-tensor with broadcasting, the
  squeeze-excite ``x * gate``, and tensor-scalar with the scalar in float32), max pooling;
* **within 1 ulp, not bit-exact**: functions of ``exp``/``erf``/``tanh`` (sigmoid, SiLU
  ``x / (1 + exp(-x))``, GELU, tanh) use TVM's math library, not PyTorch's (SLEEF); means and
  average pools sum in float64 and round once to float32 (PyTorch sums float32 in its own order);
  float ``nn.Conv2d``/``nn.Linear``/BatchNorm sum in another order. A last-ulp difference flips the
  next ``Quantize``'s rounding when the value lies that close to a rounding boundary, so TVM
  agrees with the reference within **1 LSB at the island's output codes** (rarely differs at all),
  and bit for bit everywhere else. ``verify.py`` checks exactly that, teacher-forced (each
  island and integer op on the reference's own inputs), so flips carried downstream through
  chained islands are told apart from defects.

Elementwise unary functions of <= 8-bit codes do not stay float: ``convert`` turns them into an
:class:`~djpq_compiler.ir.lookup.IntLUT`, lowered here as ``take`` on an integer
table, bit-exact. Which ops are elementwise (and so table candidates) is data in
``djpq_compiler/op_facts.py`` (``ELEMENTWISE_UNARY``, ``ELEMENTWISE_BINARY``; named by
``UNARY_OPS``/``BINARY_OPS`` of ``djpq_compiler/ir/lookup.py``), shared by ``convert`` and the
backends. This module is TVM-facing only through :class:`~.adapter.Builder`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import BackendError
from djpq_compiler.ir.lookup import BINARY_OPS, UNARY_OPS, IntLUT
from djpq_compiler.ir.pooling import (
    adaptive_bin_matrix,
    avg_counts,
    ceil_extra_padding,
    pooled_size,
)
from djpq_compiler.registry import node_key

from ..common_ops import binary_alpha, clamp_bounds, cumsum_dim, flip_dims, rsub_operand
from .emit import FloatValue, IntValue, Lowered, Lowering, container_dtype, register

__all__ = ["FLOAT_UNARY"]

Emit = Callable[[Lowering, fx.Node, Any], Any]



def _float_arg(ctx: Lowering, node: fx.Node, index: int = 0) -> Any:
    value = ctx.value(node.args[index])
    if not isinstance(value, FloatValue):
        raise BackendError(f"{node.format_node()}: float op expects a float tensor as input "
                           f"{index}, got {type(value).__name__} (codes are dequantized first)")
    return value.expr


def _f32(ctx: Lowering, value: float) -> Any:
    return ctx.bb.const(np.float32(value), "float32")


# ------------------------------------------------------------------------------ unary


def _relu(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    return ctx.bb.call("nn.relu", x)


def _relu6(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    return ctx.bb.clip(x, 0.0, 6.0)


def _hardtanh(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    if node.op == "call_module":
        module = ctx.module(node)
        lo, hi = float(module.min_val), float(module.max_val)
    else:
        lo = float(ctx.arg(node, 1, "min_val", -1.0))
        hi = float(ctx.arg(node, 2, "max_val", 1.0))
    return ctx.bb.clip(x, lo, hi)


def _clamp3(ctx: Lowering, x: Any) -> Any:
    """``min(max(x + 3, 0), 6)`` in float32 (PyTorch's hardsigmoid/hardswish kernels)."""
    return ctx.bb.clip(ctx.bb.binary("add", x, _f32(ctx, 3.0)), 0.0, 6.0)


def _hardsigmoid(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    return ctx.bb.binary("divide", _clamp3(ctx, x), _f32(ctx, 6.0))


def _hardswish(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    return ctx.bb.binary("divide", ctx.bb.binary("multiply", x, _clamp3(ctx, x)), _f32(ctx, 6.0))


def _one_plus_exp_neg(ctx: Lowering, x: Any) -> Any:
    return ctx.bb.binary("add", _f32(ctx, 1.0), ctx.bb.unary("exp", ctx.bb.unary("negative", x)))


def _sigmoid(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    return ctx.bb.binary("divide", _f32(ctx, 1.0), _one_plus_exp_neg(ctx, x))


def _silu(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    return ctx.bb.binary("divide", x, _one_plus_exp_neg(ctx, x))


def _tanh(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    return ctx.bb.unary("tanh", x)


def _gelu(ctx: Lowering, node: fx.Node, x: Any) -> Any:
    """``0.5 x (1 + erf(x / sqrt 2))``, or with ``approximate="tanh"``
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    module = ctx.module(node) if node.op == "call_module" else None
    approximate = (module.approximate if module is not None
                   else str(node.kwargs.get("approximate", "none")))
    mul, add = (lambda a, b: ctx.bb.binary("multiply", a, b)), (
        lambda a, b: ctx.bb.binary("add", a, b))
    if approximate == "tanh":
        cube = mul(mul(x, x), x)
        inner = mul(_f32(ctx, math.sqrt(2.0 / math.pi)), add(x, mul(_f32(ctx, 0.044715), cube)))
        core = ctx.bb.unary("tanh", inner)
    elif approximate == "none":
        core = ctx.bb.unary("erf", mul(x, _f32(ctx, math.sqrt(0.5))))
    else:
        raise BackendError(f"{node.format_node()}: GELU approximate={approximate!r} is unknown")
    return mul(mul(_f32(ctx, 0.5), x), add(_f32(ctx, 1.0), core))


#: Float lowering of each elementwise unary op, by the canonical name of ``UNARY_OPS``.
FLOAT_UNARY: dict[str, Emit] = {
    "relu": _relu, "relu6": _relu6, "hardtanh": _hardtanh, "sigmoid": _sigmoid,
    "hardsigmoid": _hardsigmoid, "hardswish": _hardswish, "silu": _silu, "gelu": _gelu,
    "tanh": _tanh,
}


def _convert_unary(ctx: Lowering, node: fx.Node) -> Lowered:
    """An elementwise unary float op of a float island (name from ``UNARY_OPS``)."""
    x = _float_arg(ctx, node)
    return FloatValue(FLOAT_UNARY[UNARY_OPS[node_key(ctx.gm, node)]](ctx, node, x))


register(*[t for t, name in UNARY_OPS.items() if name in FLOAT_UNARY])(_convert_unary)


# ------------------------------------------------------------------------------ binary


def _operand(ctx: Lowering, node: fx.Node, value: Any, index: int) -> Any:
    if isinstance(value, FloatValue):
        return value.expr
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _f32(ctx, float(value))  # PyTorch casts the scalar to float32 first
    raise BackendError(f"{node.format_node()}: float arithmetic expects float tensors or "
                       f"numbers, got {type(value).__name__} as operand {index}")


_PY = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b,
       "multiply": lambda a, b: a * b, "divide": lambda a, b: a / b}


@register(*BINARY_OPS)
def convert_binary(ctx: Lowering, node: fx.Node) -> Lowered:
    """Float ``a op b`` with broadcasting; on two Python numbers (static sizes) the number."""
    target: Any = (node.target if node.op == "call_function"
                   else getattr(torch.Tensor, str(node.target)))
    name = BINARY_OPS[target]
    alpha = binary_alpha(node, name)
    a = ctx.value(node.args[0])
    b = ctx.value(node.args[1] if len(node.args) > 1 else node.kwargs["other"])
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return _PY[name](a, b * alpha if alpha != 1 else b)
    rhs = _operand(ctx, node, b, 1)
    if alpha != 1:  # a + alpha * b, the product rounded to float32 first
        rhs = ctx.bb.binary("multiply", rhs, _f32(ctx, alpha))
    return FloatValue(ctx.bb.binary(name, _operand(ctx, node, a, 0), rhs))


# ------------------------------------------------------------------------------ reductions, pools


def _mean_f32(ctx: Lowering, x: Any, axes: list[int], keepdims: bool) -> Any:
    """Mean in float64, rounded once to float32."""
    wide = ctx.bb.astype(x, "float64")
    return ctx.bb.astype(ctx.bb.call("mean", wide, axes, keepdims), "float32")


@register(torch.mean, torch.Tensor.mean)
def convert_mean(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.mean(dim, keepdim)`` over static dims (all dims when ``dim`` is None)."""
    x = _float_arg(ctx, node)
    ndim = len(ctx.bb.shape(x))
    dims = ctx.arg(node, 1, "dim", None)
    dims = list(range(ndim)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    if node.kwargs.get("dtype") is not None:
        raise BackendError(f"{node.format_node()}: mean with a dtype is not lowered")
    keep = bool(ctx.arg(node, 2, "keepdim", False))
    return FloatValue(_mean_f32(ctx, x, [int(d) % ndim for d in dims], keep))


@register(torch.rsub)
def convert_rsub(ctx: Lowering, node: fx.Node) -> Lowered:
    """``torch.rsub(x, other)`` = ``other - x`` on floats."""
    other = ctx.value(rsub_operand(node))
    x = ctx.value(node.args[0])
    return FloatValue(ctx.bb.binary("subtract", _operand(ctx, node, other, 1),
                                    _operand(ctx, node, x, 0)))


@register(torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip)
def convert_clamp(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.clamp(min, max)`` on floats with number bounds: ``min(max(x, min), max)``, which is
    also PyTorch's answer (``max``) where ``min > max``."""
    lo, hi = clamp_bounds(node, ctx.value)
    x = _float_arg(ctx, node)
    if lo is not None:
        x = ctx.bb.binary("maximum", x, _f32(ctx, float(lo)))
    if hi is not None:
        x = ctx.bb.binary("minimum", x, _f32(ctx, float(hi)))
    return FloatValue(x)


@register(torch.cumsum, torch.Tensor.cumsum)
def convert_cumsum(ctx: Lowering, node: fx.Node) -> Lowered:
    """``torch.cumsum(x, dim)`` on floats (a float island: TVM's running sum may round
    differently from PyTorch's, within the islands' 1 LSB at the next quantizer)."""
    x = _float_arg(ctx, node)
    dim = cumsum_dim(node, len(ctx.bb.shape(x)))
    return FloatValue(ctx.bb.call("cumsum", x, axis=dim))


@register(torch.flip, torch.Tensor.flip)
def convert_flip(ctx: Lowering, node: fx.Node) -> Lowered:
    """``torch.flip(x, dims)`` on floats: one reversal per dim (exact)."""
    x = _float_arg(ctx, node)
    for dim in flip_dims(node, len(ctx.bb.shape(x))):
        x = ctx.bb.call("flip", x, axis=dim)
    return FloatValue(x)


def _pool_params(ctx: Lowering, node: fx.Node, names: tuple[str, ...],
                 defaults: tuple[Any, ...]) -> dict[str, Any]:
    if node.op == "call_module":
        module = ctx.module(node)
        return {n: getattr(module, n, d) for n, d in zip(names, defaults, strict=True)}
    return {n: ctx.arg(node, i + 1, n, d)
            for i, (n, d) in enumerate(zip(names, defaults, strict=True))}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    vals = tuple(int(v) for v in value)
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


@register(*facts.MAX_POOL2D_OP.keys())
def convert_max_pool(ctx: Lowering, node: fx.Node) -> Lowered:
    """Float max pooling (exact: a max of float32 values)."""
    p = _pool_params(ctx, node, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                 "return_indices"), (None, None, 0, 1, False, False))
    if p["return_indices"]:
        raise BackendError(f"{node.format_node()}: return_indices is not lowered")
    kernel = _pair(p["kernel_size"])
    stride = kernel if p["stride"] in (None, (), []) else _pair(p["stride"])
    x = _float_arg(ctx, node)
    return FloatValue(ctx.bb.max_pool2d(x, kernel, stride, _pair(p["padding"]),
                                        _pair(p["dilation"]), bool(p["ceil_mode"])))


@register(*facts.AVG_POOL2D_OP.keys())
def convert_avg_pool(ctx: Lowering, node: fx.Node) -> Lowered:
    """Float average pooling: window sums in float64 (a depthwise conv with a ones kernel),
    torch's divisor per window, one rounding to float32."""
    p = _pool_params(ctx, node, ("kernel_size", "stride", "padding", "ceil_mode",
                                 "count_include_pad", "divisor_override"),
                     (None, None, 0, False, True, None))
    x = _float_arg(ctx, node)
    kernel = _pair(p["kernel_size"])
    stride = kernel if p["stride"] in (None, (), []) else _pair(p["stride"])
    pad = _pair(p["padding"])
    _, channels, h, w = ctx.bb.shape(x)
    out_hw = (pooled_size(h, kernel[0], stride[0], pad[0], bool(p["ceil_mode"])),
              pooled_size(w, kernel[1], stride[1], pad[1], bool(p["ceil_mode"])))
    extra = ceil_extra_padding((h, w), out_hw, kernel, stride, pad)
    ones = ctx.bb.const(np.ones((channels, 1) + kernel), "float64")
    sums = ctx.bb.conv2d(ctx.bb.astype(x, "float64"), ones, stride,
                         (pad[0], pad[1], pad[0] + extra[0], pad[1] + extra[1]), (1, 1),
                         channels, "float64")
    if p["divisor_override"] is not None:
        counts = np.array(float(p["divisor_override"]))
    else:
        counts = avg_counts((h, w), out_hw, kernel, stride, pad,
                            bool(p["count_include_pad"])).numpy().astype(np.float64)
    mean = ctx.bb.binary("divide", sums, ctx.bb.const(counts, "float64"))
    return FloatValue(ctx.bb.astype(mean, "float32"))


@register(*facts.ADAPTIVE_AVG_POOL2D_OP.keys())
def convert_adaptive_avg_pool(ctx: Lowering, node: fx.Node) -> Lowered:
    """Float adaptive average pooling: torch's (overlapping) bins as 0/1 matrices, sums in
    float64, divided by each bin's size, one rounding to float32."""
    size = (ctx.module(node).output_size if node.op == "call_module"
            else ctx.arg(node, 1, "output_size", None))
    x = _float_arg(ctx, node)
    shape = ctx.bb.shape(x)
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    out_h, out_w = (shape[2 + i] if s is None else int(s) for i, s in enumerate(sizes))
    if (out_h, out_w) == (1, 1):
        return FloatValue(_mean_f32(ctx, x, [2, 3], True))
    p_h = adaptive_bin_matrix(shape[2], out_h).numpy().astype(np.float64)
    p_w = adaptive_bin_matrix(shape[3], out_w).numpy().astype(np.float64)
    rows = ctx.bb.matmul(ctx.bb.astype(x, "float64"), ctx.bb.const(p_w.T.copy(), "float64"),
                         "float64")
    sums = ctx.bb.matmul(ctx.bb.const(p_h, "float64"), rows, "float64")
    counts = p_h.sum(axis=1)[:, None] * p_w.sum(axis=1)[None, :]
    mean = ctx.bb.binary("divide", sums, ctx.bb.const(counts, "float64"))
    return FloatValue(ctx.bb.astype(mean, "float32"))


# ------------------------------------------------------------------------------ float layers


@register(nn.Conv2d)
def convert_float_conv2d(ctx: Lowering, node: fx.Node) -> Lowered:
    """A float ``nn.Conv2d`` left in an island (zero padding, explicit sizes)."""
    module = ctx.module(node)
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise BackendError(f"{node.format_node()}: only zero padding with explicit sizes")
    x = _float_arg(ctx, node)
    weight = module.weight.detach().cpu().numpy()
    out = ctx.bb.conv2d(x, ctx.bb.const(weight, "float32"), _pair(module.stride),
                        _pair(module.padding), _pair(module.dilation), int(module.groups),
                        "float32")
    if module.bias is not None:
        bias = module.bias.detach().cpu().numpy().reshape(1, -1, 1, 1)
        out = ctx.bb.binary("add", out, ctx.bb.const(bias, "float32"))
    return FloatValue(out)


@register(nn.Linear)
def convert_float_linear(ctx: Lowering, node: fx.Node) -> Lowered:
    """A float ``nn.Linear`` left in an island: ``x @ W^T + b``."""
    module = ctx.module(node)
    x = _float_arg(ctx, node)
    weight_t = np.ascontiguousarray(module.weight.detach().cpu().numpy().T)
    out = ctx.bb.matmul(x, ctx.bb.const(weight_t, "float32"), "float32")
    if module.bias is not None:
        out = ctx.bb.binary("add", out, ctx.bb.const(module.bias.detach().cpu().numpy(),
                                                     "float32"))
    return FloatValue(out)


@register(nn.BatchNorm2d)
def convert_float_batch_norm(ctx: Lowering, node: fx.Node) -> Lowered:
    """An eval-mode ``nn.BatchNorm2d`` left in an island: ``x * a + b`` per channel with
    ``a = gamma / sqrt(var + eps)``, ``b = beta - mean * a`` (float64, rounded to float32)."""
    module = ctx.module(node)
    if module.training or module.running_mean is None:
        raise BackendError(f"{node.format_node()}: BatchNorm in training mode (or without "
                           "running statistics) is not lowered; call .eval() first")
    x = _float_arg(ctx, node)
    c = int(module.num_features)
    gamma = (module.weight.detach().double() if module.weight is not None
             else torch.ones(c, dtype=torch.float64))
    beta = (module.bias.detach().double() if module.bias is not None
            else torch.zeros(c, dtype=torch.float64))
    a = gamma / torch.sqrt(module.running_var.double() + float(module.eps))
    b = beta - module.running_mean.double() * a
    scale = ctx.bb.const(a.numpy().reshape(1, -1, 1, 1), "float32")
    shift = ctx.bb.const(b.numpy().reshape(1, -1, 1, 1), "float32")
    return FloatValue(ctx.bb.binary("add", ctx.bb.binary("multiply", x, scale), shift))


# ------------------------------------------------------------------------------ lookup tables


@register(IntLUT)
def convert_lut(ctx: Lowering, node: fx.Node) -> Lowered:
    """``table[q - in_qmin]`` as ``take`` on an integer constant (bit-exact).

    Lane-wise: a packed input stays packed (``layout.PACKED_OPS[IntLUT]``); its padding lanes
    look up table entries too, and the index is clipped to the table so that no lane, whatever
    its code, reads outside it (real lanes are in range, checked here, so the clip never
    changes them)."""
    from .converters import _lanewise_args

    module = ctx.module(node)
    q = _lanewise_args(ctx, node, 1)[0]
    if q.lo < module.in_qmin or q.hi > module.in_qmax:
        raise BackendError(f"{node.format_node()}: input codes [{q.lo}, {q.hi}] exceed the "
                           f"table's [{module.in_qmin}, {module.in_qmax}]")
    index = ctx.bb.astype(q.expr, "int32")
    if module.in_qmin:
        index = ctx.bb.binary("subtract", index, ctx.bb.const(np.int32(module.in_qmin), "int32"))
    table = module.table.detach().cpu().numpy()
    if q.layout.packed:
        index = ctx.bb.clip(index, 0, len(table) - 1)
    dtype = container_dtype(module.qmin, module.qmax)
    out = ctx.bb.call("take", ctx.bb.const(table, dtype), index, 0)
    return IntValue(out, module.qmin, module.qmax, q.layout)

"""Windowed attention and its data movement in Relax: ``F.pad`` (constant), ``torch.roll``,
``torch.einsum`` and torchvision Swin's leaf functions ``_patch_merging_pad``,
``_get_relative_position_bias`` and ``shifted_window_attention`` (V1 and V2).

What each computes is planned once for every backend in ``backends/common_ops.py``
(:func:`~..common_ops.window_attention_plan`). Padding, rolling, window partition/merge, the
relative-position-bias gather and the shift mask move or add exact values (bit-exact); the
attention itself is a float32 island like ``transformer_ops.py``: TVM's matmul summation order,
``exp`` and ``sqrt`` may differ from PyTorch's by a few float32 ulps, so the next ``Quantize`` may
land one LSB away where a value sits on a rounding tie.

``F.pad``, ``torch.roll`` and the patch-merging pad also move integer codes (zero padding is
code 0, which is real 0 under the project's symmetric quantization): the value stays integer
with its range widened to include 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from djpq_compiler.errors import BackendError

from ..common_ops import (
    SWIN_ATTENTION,
    SWIN_PATCH_MERGING_PAD,
    SWIN_RELATIVE_POSITION_BIAS,
    WindowAttentionPlan,
    einsum_equation,
    pad_widths,
    relative_position_index,
    roll_plan,
    window_attention_plan,
)
from ..lowering import call_arg
from .emit import FloatValue, IntValue, Lowered, Lowering, register
from .transformer_ops import _float, _linear, _matmul, _swap_last

__all__: list[str] = []

Tensorish = IntValue | FloatValue


def _tensor(ctx: Lowering, node: fx.Node, arg: Any) -> Tensorish:
    value = ctx.value(arg)
    if not isinstance(value, (IntValue, FloatValue)):
        raise BackendError(f"{node.format_node()}: expects a tensor input, got {value!r}")
    return value


def _rewrap(value: Tensorish, expr: Any, zero: bool = False) -> Tensorish:
    """``expr`` with ``value``'s kind; ``zero``: zeros were added, the range must hold 0."""
    if isinstance(value, FloatValue):
        return FloatValue(expr)
    return IntValue(expr, min(value.lo, 0) if zero else value.lo,
                    max(value.hi, 0) if zero else value.hi)


def _pad(ctx: Lowering, value: Tensorish, widths: list[tuple[int, int]],
         fill: float = 0.0) -> Tensorish:
    if not any(before or after for before, after in widths):
        return value
    flat = [w for pair in widths for w in pair]
    return _rewrap(value, ctx.bb.call("nn.pad", value.expr, flat, "constant", fill), zero=True)


def _roll(ctx: Lowering, expr: Any, plan: list[tuple[int, int]]) -> Any:
    """``torch.roll`` as slices and a concat per rolled axis (exact)."""
    for axis, shift in plan:
        size = ctx.bb.shape(expr)[axis]
        tail = ctx.bb.strided_slice(expr, [axis], [size - shift], [size], [1])
        head = ctx.bb.strided_slice(expr, [axis], [0], [size - shift], [1])
        expr = ctx.bb.concat([tail, head], axis)
    return expr


@register(F.pad)
def convert_pad(ctx: Lowering, node: fx.Node) -> Lowered:
    """``F.pad(x, pad, mode="constant", value=0)``; integer codes only with ``value`` 0."""
    x = _tensor(ctx, node, node.args[0])
    value = ctx.value(call_arg(node, 3, "value", None))
    widths = pad_widths(node, len(ctx.bb.shape(x.expr)), ctx.value(call_arg(node, 1, "pad", None)),
                        ctx.value(call_arg(node, 2, "mode", "constant")), value)
    if isinstance(x, IntValue) and value not in (None, 0, 0.0):
        raise BackendError(f"{node.format_node()}: padding integer codes with {value!r} is not "
                           "lowered (only 0, which is code 0)")
    return _pad(ctx, x, widths, float(value or 0.0))


@register(torch.roll, torch.Tensor.roll)
def convert_roll(ctx: Lowering, node: fx.Node) -> Lowered:
    """``torch.roll(x, shifts, dims)`` along the given dims (codes or floats, exact)."""
    x = _tensor(ctx, node, node.args[0])
    plan = roll_plan(node, ctx.bb.shape(x.expr), ctx.value(call_arg(node, 1, "shifts", None)),
                     ctx.value(call_arg(node, 2, "dims", None)))
    return _rewrap(x, _roll(ctx, x.expr, plan))


@register(torch.einsum)
def convert_einsum(ctx: Lowering, node: fx.Node) -> Lowered:
    """``torch.einsum(equation, *operands)`` of float tensors (operands as varargs or one
    list), as Relax ``einsum`` (a float island; MaxViT's attention products)."""
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = einsum_equation(node, ctx.value(node.args[0]), len(operands))
    exprs = [_float(ctx, node, arg) for arg in operands]
    return FloatValue(ctx.bb.call("einsum", exprs, equation))


@register(*SWIN_PATCH_MERGING_PAD)
def convert_patch_merging_pad(ctx: Lowering, node: fx.Node) -> Lowered:
    """``(..., H, W, C) -> (..., ceil(H/2), ceil(W/2), 4C)``: zero-pad H and W to even, then
    the four 2x2 phases ``(0,0), (1,0), (0,1), (1,1)`` concatenated along channels."""
    x = _tensor(ctx, node, node.args[0])
    shape = ctx.bb.shape(x.expr)
    if len(shape) < 3:
        raise BackendError(f"{node.format_node()}: expects a (..., H, W, C) input")
    h_axis, w_axis = len(shape) - 3, len(shape) - 2
    widths = [(0, 0)] * len(shape)
    widths[h_axis], widths[w_axis] = (0, shape[h_axis] % 2), (0, shape[w_axis] % 2)
    x = _pad(ctx, x, widths)
    padded = ctx.bb.shape(x.expr)
    phases = [ctx.bb.strided_slice(x.expr, [h_axis, w_axis], [dh, dw],
                                   [padded[h_axis], padded[w_axis]], [2, 2])
              for dh, dw in ((0, 0), (1, 0), (0, 1), (1, 1))]
    return _rewrap(x, ctx.bb.concat(phases, len(shape) - 1))


@register(*SWIN_RELATIVE_POSITION_BIAS)
def convert_relative_position_bias(ctx: Lowering, node: fx.Node) -> Lowered:
    """``table[index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)``: a gather (exact)."""
    table = _float(ctx, node, node.args[0])
    index, tokens = relative_position_index(ctx, node)
    rows, heads = (ctx.bb.shape(table) + (0,))[:2]
    if len(ctx.bb.shape(table)) != 2 or index.min() < 0 or index.max() >= rows:
        raise BackendError(f"{node.format_node()}: expects a (rows, heads) table and indices "
                           f"in [0, rows), got {ctx.bb.shape(table)}")
    gathered = ctx.bb.call("take", table, ctx.bb.const(index, "int64"), 0)
    grid = ctx.bb.reshape(gathered, (tokens, tokens, heads))
    return FloatValue(ctx.bb.reshape(ctx.bb.permute(grid, [2, 0, 1]), (1, heads, tokens, tokens)))


def _normalize(ctx: Lowering, x: Any) -> Any:
    """``F.normalize(x, dim=-1)``: ``x / max(||x||_2, 1e-12)``."""
    axis = len(ctx.bb.shape(x)) - 1
    squares = ctx.bb.call("sum", ctx.bb.binary("multiply", x, x), [axis], True)
    norm = ctx.bb.unary("sqrt", squares)
    floor = ctx.bb.const(np.float32(1e-12), "float32")
    return ctx.bb.binary("divide", x, ctx.bb.call("maximum", norm, floor))


def _partition(ctx: Lowering, x: Any, plan: WindowAttentionPlan) -> Any:
    """``(B, pH, pW, C) -> (B * windows, N, C)``."""
    b, _, _, c = plan.shape
    (gh, gw), (wh, ww) = plan.grid, plan.window
    x = ctx.bb.permute(ctx.bb.reshape(x, (b, gh, wh, gw, ww, c)), [0, 1, 3, 2, 4, 5])
    return ctx.bb.reshape(x, (b * gh * gw, plan.tokens, c))


def _merge(ctx: Lowering, x: Any, plan: WindowAttentionPlan) -> Any:
    """``(B * windows, N, C) -> (B, pH, pW, C)``."""
    b, _, _, c = plan.shape
    (gh, gw), (wh, ww) = plan.grid, plan.window
    x = ctx.bb.permute(ctx.bb.reshape(x, (b, gh, gw, wh, ww, c)), [0, 1, 3, 2, 4, 5])
    return ctx.bb.reshape(x, (b, plan.padded[0], plan.padded[1], c))


def _const(ctx: Lowering, array: np.ndarray | None) -> Any:
    return None if array is None else ctx.bb.const(array, "float32")


def _scores(ctx: Lowering, q: Any, k: Any, plan: WindowAttentionPlan) -> Any:
    """``(q * scale) @ k^T`` (V1) or ``normalize(q) @ normalize(k)^T * logit_scale`` (V2)."""
    if plan.logit_scale is None:
        q = ctx.bb.binary("multiply", q, ctx.bb.const(np.float32(plan.q_scale), "float32"))
        return _matmul(ctx, q, _swap_last(ctx, k))
    scores = _matmul(ctx, _normalize(ctx, q), _swap_last(ctx, _normalize(ctx, k)))
    scale = plan.logit_scale.reshape(plan.heads, 1, 1)
    return ctx.bb.binary("multiply", scores, ctx.bb.const(scale, "float32"))


def _attend(ctx: Lowering, x: Any, bias: Any, plan: WindowAttentionPlan) -> Any:
    """Multi-head attention inside each window: ``(B*nW, N, C) -> (B*nW, N, C)``."""
    c, n, heads = plan.shape[3], plan.tokens, plan.heads
    rows = ctx.bb.shape(x)[0]
    qkv = _linear(ctx, x, torch.from_numpy(plan.qkv_weight),
                  None if plan.qkv_bias is None else torch.from_numpy(plan.qkv_bias))
    qkv = ctx.bb.permute(ctx.bb.reshape(qkv, (rows, n, 3, heads, c // heads)), [0, 2, 3, 1, 4])
    q, k, v = (ctx.bb.reshape(ctx.bb.strided_slice(qkv, [1], [i], [i + 1], [1]),
                              (rows, heads, n, c // heads)) for i in range(3))
    scores = ctx.bb.binary("add", _scores(ctx, q, k, plan), bias)
    if plan.mask is not None:
        windows = plan.mask.shape[0]
        scores = ctx.bb.reshape(scores, (rows // windows, windows, heads, n, n))
        scores = ctx.bb.binary("add", scores, _const(ctx, plan.mask[None, :, None]))
        scores = ctx.bb.reshape(scores, (rows, heads, n, n))
    probs = ctx.bb.call("nn.softmax", scores, 3)
    out = ctx.bb.reshape(ctx.bb.permute(_matmul(ctx, probs, v), [0, 2, 1, 3]), (rows, n, c))
    return _linear(ctx, out, torch.from_numpy(plan.proj_weight),
                   None if plan.proj_bias is None else torch.from_numpy(plan.proj_bias))


@register(*SWIN_ATTENTION)
def convert_shifted_window_attention(ctx: Lowering, node: fx.Node) -> Lowered:
    """torchvision's ``shifted_window_attention`` (plan: ``window_attention_plan``)."""
    x = _float(ctx, node, node.args[0])
    plan = window_attention_plan(ctx, node, ctx.bb.shape(x))
    bias = _float(ctx, node, call_arg(node, 3, "relative_position_bias", None))
    n, heads = plan.tokens, plan.heads
    if ctx.bb.shape(bias) not in ((1, heads, n, n), (heads, n, n)):
        raise BackendError(f"{node.format_node()}: relative_position_bias of shape "
                           f"{ctx.bb.shape(bias)}, expected (1, {heads}, {n}, {n})")
    b, h, w, _ = plan.shape
    ph, pw = plan.padded
    x = _pad(ctx, FloatValue(x), [(0, 0), (0, ph - h), (0, pw - w), (0, 0)]).expr
    s_h, s_w = plan.shift
    x = _roll(ctx, x, [(a, s % p) for a, s, p in ((1, -s_h, ph), (2, -s_w, pw)) if s % p])
    x = _merge(ctx, _attend(ctx, _partition(ctx, x, plan), bias, plan), plan)
    x = _roll(ctx, x, [(a, s % p) for a, s, p in ((1, s_h, ph), (2, s_w, pw)) if s % p])
    if (ph, pw) != (h, w):
        x = ctx.bb.strided_slice(x, [1, 2], [0, 0], [h, w], [1, 1])
    return FloatValue(x)

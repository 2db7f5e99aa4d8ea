"""Average pools on integer codes, exactly as ``djpq_compiler/ir/pooling.py``.

``out = div_half_up(S, c) = floor((2S + c) / (2c))`` with ``S`` the exact window sum (a depthwise
conv with a ones kernel for ``avg_pool2d``, two 0/1 matmuls for adaptive bins) and ``c`` torch's
divisor, a constant computed here from the static shapes.

On a packed ``NCHW{L}c`` input (``layout.py``) the pools are lane-wise: ``avg_pool2d`` sums its
windows as ``kh * kw`` strided slices of the (zero-padded) packed value, one fused elementwise
kernel; a window covering the whole input (the global pool before a classifier) and an adaptive
pool to ``1x1`` are one sum over ``H, W``. Divisors and per-position multipliers broadcast over
the lanes. The result stays packed (``[N, CB, OH, OW, L]``, padding lanes pooled among
themselves), so the producer before the pool writes packed and only the small pooled value is
unpacked, by whichever consumer needs NCHW. Other adaptive pools unpack their input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from djpq_compiler.ir import modules as im
from djpq_compiler.ir.pooling import (
    adaptive_bin_matrix,
    avg_counts,
    ceil_extra_padding,
    pooled_size,
)

from .converters import _depthwise_1x1, _lanewise_args, _pair, _strides, requantize
from .emit import IntValue, Lowered, Lowering, container_dtype, register
from .layout import NCHW, Layout

INT32_MAX = 2**31 - 1


def _per_position(values: np.ndarray, layout: Layout) -> np.ndarray:
    """Per-output-position ``(OH, OW)`` constants shaped to broadcast over ``layout``'s value
    (``(OH, OW, 1)`` over the lanes of a packed one)."""
    return values.reshape(values.shape + (1,)) if layout.packed else values


def _div_half_up(ctx: Lowering, sums: Any, counts: np.ndarray, sum_bound: int,
                 layout: Layout = NCHW) -> Any:
    """``floor((2S + c) / (2c))`` in int32 (int64 when ``2|S| + c`` could overflow)."""
    dtype = "int32" if 2 * sum_bound + 2 * int(counts.max()) <= INT32_MAX else "int64"
    sums = ctx.bb.astype(sums, dtype)
    counts = _per_position(counts, layout)
    shape = counts.shape if counts.size > 1 else ()
    c = ctx.bb.const(counts.reshape(shape), dtype)
    num = ctx.bb.binary("add", ctx.bb.binary("add", sums, sums), c)
    return ctx.bb.binary("floor_divide", num, ctx.bb.binary("add", c, c))


def _quotient_range(lo: int, hi: int, window: int, min_count: int) -> tuple[int, int]:
    """Bounds of ``div_half_up(S, c)`` for ``S`` in ``[window*min(lo,0), window*max(hi,0)]``."""
    s_lo, s_hi = window * min(lo, 0), window * max(hi, 0)
    return ((2 * s_lo + min_count) // (2 * min_count), (2 * s_hi + min_count) // (2 * min_count))


def _packed_window_sum(ctx: Lowering, x: IntValue, kernel: tuple[int, int],
                       stride: tuple[int, int], pads: tuple[int, int, int, int], acc: str) -> Any:
    """Exact window sums of a packed ``[N, CB, H, W, L]`` value, lane by lane: one sum over
    ``H, W`` for a window covering the unpadded input, else the sum of the ``kh * kw``
    strided slices of the zero-padded value (one fused elementwise kernel)."""
    data = ctx.bb.astype(x.expr, acc)
    h, w = ctx.bb.shape(data)[2:4]
    top, left, bottom, right = pads
    if not any(pads) and kernel == (h, w):
        return ctx.bb.call("sum", data, axis=[2, 3], keepdims=True)
    if any(pads):
        data = ctx.bb.call("nn.pad", data, [0, 0, 0, 0, top, bottom, left, right, 0, 0])
    out_h = (h + top + bottom - kernel[0]) // stride[0] + 1
    out_w = (w + left + right - kernel[1]) // stride[1] + 1
    total = None
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            part = ctx.bb.strided_slice(data, [2, 3], [i, j], [i + (out_h - 1) * stride[0] + 1,
                                                              j + (out_w - 1) * stride[1] + 1],
                                        [stride[0], stride[1]])
            total = part if total is None else ctx.bb.binary("add", total, part)
    return total


def _window_sum(ctx: Lowering, x: IntValue, kernel: tuple[int, int], stride: tuple[int, int],
                pads: tuple[int, int, int, int], bound: int) -> Any:
    """Exact window sums: a depthwise conv with a ones kernel, int32/int64 accumulation (lane
    by lane for a packed ``x``); ``pads`` are ``(top, left, bottom, right)``."""
    if x.layout.packed:
        return _packed_window_sum(ctx, x, kernel, stride, pads,
                                  "int32" if bound <= INT32_MAX else "int64")
    channels = ctx.bb.shape(x.expr)[1]
    acc = "int32" if bound <= INT32_MAX else "int64"
    x_dtype = container_dtype(x.lo, x.hi)
    w_dtype = "int8" if x_dtype in ("int8", "uint8") else acc
    data = ctx.bb.astype(x.expr, x_dtype if w_dtype == "int8" else acc)
    if kernel == (1, 1):  # not the 1x1 depthwise conv2d TVM 0.27 miscompiles before an add
        return _depthwise_1x1(ctx, data, np.ones((channels, 1, 1, 1), np.int64), stride, pads,
                              acc)
    ones = ctx.bb.const(np.ones((channels, 1) + kernel, dtype=np.int64), w_dtype)
    return ctx.bb.conv2d(data, ones, stride, pads, (1, 1), channels, acc)


def _avg_sums(ctx: Lowering, x: IntValue, module: Any
              ) -> tuple[Any, int, np.ndarray, tuple[int, int]]:
    """Window sums of ``avg_pool2d`` on codes, their bound, torch's divisors and the kernel."""
    kernel = _pair(module.kernel_size)
    stride, (p_h, p_w) = _strides(kernel, module.stride), _pair(module.padding)
    in_hw = (ctx.bb.shape(x.expr)[2], ctx.bb.shape(x.expr)[3])
    out_h, out_w = (pooled_size(n, k, s, p, bool(module.ceil_mode))
                    for n, k, s, p in zip(in_hw, kernel, stride, (p_h, p_w), strict=True))
    out_hw = (out_h, out_w)
    extra = ceil_extra_padding(in_hw, out_hw, kernel, stride, (p_h, p_w))
    window = kernel[0] * kernel[1]
    bound = window * max(abs(x.lo), abs(x.hi))
    sums = _window_sum(ctx, x, kernel, stride, (p_h, p_w, p_h + extra[0], p_w + extra[1]), bound)
    counts = avg_counts(in_hw, out_hw, kernel, stride, (p_h, p_w),
                        bool(module.count_include_pad)).numpy()
    return sums, bound, counts, kernel


@register(im.IntAvgPool2d)
def convert_avg_pool(ctx: Lowering, node: fx.Node) -> Lowered:
    """``avg_pool2d`` on codes: window sum, torch's divisor, round half up."""
    module = ctx.module(node)
    (x,) = _lanewise_args(ctx, node, 1)
    sums, bound, counts, kernel = _avg_sums(ctx, x, module)
    if module.divisor_override is not None:
        counts = np.array([[int(module.divisor_override)]], dtype=np.int64)
        lo, hi = _quotient_range(x.lo, x.hi, kernel[0] * kernel[1],
                                 int(module.divisor_override))
    else:
        lo, hi = min(x.lo, 0), max(x.hi, 0)
    return ctx.int_value(_div_half_up(ctx, sums, counts, bound, x.layout), lo, hi, x.layout)


def _adaptive_out(shape: tuple[int, ...], output_size: Any) -> tuple[int, int]:
    sizes = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    out_h, out_w = (shape[2 + i] if s is None else int(s) for i, s in enumerate(sizes))
    return out_h, out_w


def _adaptive_input(ctx: Lowering, node: fx.Node, output_size: Any) -> IntValue:
    """The input of an adaptive pool: packed as it is for a ``1x1`` output (a global sum),
    else in NCHW."""
    (x,) = _lanewise_args(ctx, node, 1)
    if x.layout.packed and _adaptive_out(ctx.bb.shape(x.expr), output_size) != (1, 1):
        return ctx.int_arg(node)
    return x


def _adaptive_sums(ctx: Lowering, x: IntValue, output_size: Any
                   ) -> tuple[Any, int, np.ndarray]:
    """Adaptive-pool bin sums as ``P_h @ X @ P_w^T`` (exact int matmuls), bound, bin sizes;
    a packed ``x`` (``1x1`` output only) is summed over ``H, W``."""
    shape = ctx.bb.shape(x.expr)
    out_h, out_w = _adaptive_out(shape, output_size)
    if x.layout.packed:
        bound = shape[2] * shape[3] * max(abs(x.lo), abs(x.hi))
        sums = _packed_window_sum(ctx, x, (shape[2], shape[3]), (1, 1), (0, 0, 0, 0),
                                  "int32" if bound <= INT32_MAX else "int64")
        return sums, bound, np.array([[shape[2] * shape[3]]], dtype=np.int64)
    p_h = adaptive_bin_matrix(shape[2], out_h).numpy()
    p_w = adaptive_bin_matrix(shape[3], out_w).numpy()
    len_h, len_w = p_h.sum(axis=1), p_w.sum(axis=1)
    bound = int(len_h.max()) * int(len_w.max()) * max(abs(x.lo), abs(x.hi))
    acc = "int32" if bound <= INT32_MAX else "int64"
    data = ctx.bb.astype(x.expr, acc)
    rows = ctx.bb.matmul(data, ctx.bb.const(np.ascontiguousarray(p_w.T), acc), acc)
    sums = ctx.bb.matmul(ctx.bb.const(p_h, acc), rows, acc)
    return sums, bound, len_h[:, None] * len_w[None, :]


@register(im.IntAdaptiveAvgPool2d)
def convert_adaptive_avg_pool(ctx: Lowering, node: fx.Node) -> Lowered:
    """Adaptive average pool: bin sums, each bin's size as divisor, round half up."""
    module = ctx.module(node)
    x = _adaptive_input(ctx, node, module.output_size)
    sums, bound, counts = _adaptive_sums(ctx, x, module.output_size)
    return ctx.int_value(_div_half_up(ctx, sums, counts, bound, x.layout), x.lo, x.hi, x.layout)


@register(im.IntPoolRequantize)
def convert_pool_requantize(ctx: Lowering, node: fx.Node) -> Lowered:
    """Uneven average pool fused with its requantization: exact sums, then
    ``clip((S * m_p + 2^(shift_p - 1)) >> shift_p)`` with one ``(m, shift)`` per position."""
    module = ctx.module(node)
    pool = module.pool
    if isinstance(pool, im.IntAvgPool2d):
        (x,) = _lanewise_args(ctx, node, 1)
        sums = _avg_sums(ctx, x, pool)[0]
    else:
        x = _adaptive_input(ctx, node, pool.output_size)
        sums = _adaptive_sums(ctx, x, pool.output_size)[0]
    m = _per_position(module.m.detach().cpu().to(torch.int64).numpy(), x.layout)
    shift = _per_position(module.shift.detach().cpu().to(torch.int64).numpy(), x.layout)
    out = requantize(ctx, sums, m, shift, module.qmin, module.qmax, per_position=True)
    return ctx.int_value(out, module.qmin, module.qmax, x.layout)

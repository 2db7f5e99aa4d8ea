"""Integer average pools for the ONNX exporter, rounded exactly as the reference.

The reference (``djpq_compiler/ir/pooling.py``, ``modules.IntPoolRequantize``) sums the codes of
each window exactly and rounds once with ties towards +inf: ``floor((2 S + c) / (2 c))`` for a
pool at the input's scale (``div_half_up``), ``floor((S m_p + 2^(s_p - 1)) / 2^s_p)`` for a pool
fused with its requantization (``dyadic_round``, a multiplier per output position). A float
``DQ -> AveragePool -> Q`` rounds ``k + 1/2`` half to even and the float mean itself may land
off the tie, so it differs by one LSB on exactly the tie cases.

Here the window sums are computed in float32 on the codes (a depthwise ``Conv`` with a ones
kernel, or 0/1 bin ``MatMul`` for adaptive bins): every partial sum is an integer below 2^24, so
exact in any summation order; then ``Cast`` to int64 and the reference's rounding in int64
(``Div`` truncates toward zero, so the numerator is first offset to be non-negative).
``divisor_override`` pools keep their unrounded :class:`~.graph.SumValue` path (their
``Requantize`` rounds once).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import fx

from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im
from djpq_compiler.ir.pooling import adaptive_bin_matrix, avg_counts, ceil_extra_padding

from .graph import Emitter, QValue, SumValue, Value, container, register
from .integer_ops import _window_attrs, pair

__all__: list[str] = []

#: Largest |window sum| float32 holds exactly (every partial sum is an integer).
_EXACT_FLOAT32 = 1 << 24


def _i64(ctx: Emitter, value: Any, hint: str) -> str:
    return ctx.const(np.asarray(value, np.int64), hint)


def _window_sums(ctx: Emitter, node: fx.Node, x: QValue, pool: Any,
                 out_hw: tuple[int, int]) -> tuple[str, np.ndarray]:
    """Exact int64 window sums of ``x``'s codes for ``pool`` (``IntAvgPool2d`` or
    ``IntAdaptiveAvgPool2d``; ``node`` is the pool's node, ``x`` its input) and torch's divisor
    of every output position."""
    from onnx import TensorProto

    _, channels, h, w = ctx.shape(node.args[0])
    codes = ctx.op("Cast", [x.name], f"{node.name}/codes_f", to=TensorProto.FLOAT)
    if isinstance(pool, im.IntAvgPool2d):
        kernel, stride = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
        pad = pair(pool.padding)
        counts = avg_counts((h, w), out_hw, kernel, stride, pad,
                            bool(pool.count_include_pad)).numpy()
        extra = ceil_extra_padding((h, w), out_hw, kernel, stride, pad)
        ones = ctx.const(np.ones((channels, 1, *kernel), np.float32), f"{node.name}/ones")
        sums = ctx.op("Conv", [codes, ones], f"{node.name}/window_sum", kernel_shape=list(kernel),
                      strides=list(stride), pads=[pad[0], pad[1], pad[0] + extra[0],
                                                  pad[1] + extra[1]], group=int(channels))
        area = kernel[0] * kernel[1]
    else:
        bins_h = adaptive_bin_matrix(h, out_hw[0]).numpy()
        bins_w = adaptive_bin_matrix(w, out_hw[1]).numpy()
        rows = ctx.op("MatMul", [codes, ctx.const(bins_w.T.astype(np.float32).copy(),
                                                  f"{node.name}/bins_w")], f"{node.name}/rows")
        sums = ctx.op("MatMul", [ctx.const(bins_h.astype(np.float32), f"{node.name}/bins_h"),
                                 rows], f"{node.name}/bin_sums")
        counts = bins_h.sum(axis=1)[:, None] * bins_w.sum(axis=1)[None, :]
        area = int(counts.max())
    if area * max(abs(x.lo), abs(x.hi)) >= _EXACT_FLOAT32:
        raise BackendError(f"{node.format_node()}: window sums up to {area} x "
                           f"{max(abs(x.lo), abs(x.hi))} are not exact in float32")
    return ctx.op("Cast", [sums], f"{node.name}/sums", to=TensorProto.INT64), counts


def _floor_div(ctx: Emitter, hint: str, num: str, bound: np.ndarray, den: np.ndarray) -> str:
    """``floor(num / den)`` in int64 for ``|num| <= bound`` (per position arrays): ``Div``
    truncates, so ``K * den`` (``K = bound // den + 1``) is added first and ``K`` subtracted."""
    k = bound // den + 1
    if int((bound + k * den).max()) >= 2**63:
        raise BackendError(f"{hint}: no int64 room for the exact rounding")
    shifted = ctx.op("Add", [num, _i64(ctx, k * den, f"{hint}/offset")], f"{hint}/offset_add")
    quotient = ctx.op("Div", [shifted, _i64(ctx, den, f"{hint}/den")], f"{hint}/div")
    return ctx.op("Sub", [quotient, _i64(ctx, k, f"{hint}/k")], f"{hint}/floor")


def _codes(ctx: Emitter, node: fx.Node, value: str, lo: int, hi: int, scale: float,
           clip: bool) -> QValue:
    """int64 codes -> [clip to ``[lo, hi]``] -> the container of ``[lo, hi]``."""
    from onnx import TensorProto

    if clip:
        value = ctx.op("Max", [value, _i64(ctx, lo, f"{node.name}/qmin")], f"{node.name}/max")
        value = ctx.op("Min", [value, _i64(ctx, hi, f"{node.name}/qmax")], f"{node.name}/min")
    elem = container(lo, hi)[0]
    if elem == TensorProto.INT64:  # pragma: no cover - container() refuses wider ranges
        raise BackendError(f"{node.format_node()}: codes [{lo}, {hi}] need int64")
    return QValue(ctx.op("Cast", [value], node.name, to=elem), scale, lo, hi)


def _div_half_up(ctx: Emitter, node: fx.Node, x: QValue, pool: Any) -> QValue:
    """The reference's pool at the input's scale: ``floor((2 S + c) / (2 c))``."""
    out_hw = tuple(ctx.shape(node)[2:])
    sums, counts = _window_sums(ctx, node, x, pool, out_hw)  # type: ignore[arg-type]
    counts = counts.astype(np.int64)
    num = ctx.op("Add", [ctx.op("Mul", [sums, _i64(ctx, 2, f"{node.name}/two")],
                                f"{node.name}/twice"), _i64(ctx, counts, f"{node.name}/c")],
                 f"{node.name}/num")
    bound = 2 * int(counts.max()) * max(abs(x.lo), abs(x.hi)) + counts
    codes = _floor_div(ctx, f"{node.name}/round", num, bound, 2 * counts)
    return _codes(ctx, node, codes, min(x.lo, 0), max(x.hi, 0), x.scale, clip=False)


def requantize_pool_sum(ctx: Emitter, node: fx.Node) -> QValue | None:
    """A ``Requantize`` of a ``divisor_override`` pool (convert's window-sum pool), exactly as
    the reference: ``P = div_half_up(S, d)``, then ``(P m + 2^(s-1)) >> s``, clip, container.
    ``None`` when the input is not such a pool (the caller's float path applies)."""
    source = node.args[0]
    if not (isinstance(source, fx.Node) and source.op == "call_module"):
        return None
    pool = ctx.module(source)
    if not isinstance(pool, im.IntAvgPool2d) or pool.divisor_override is None:
        return None
    module = ctx.module(node)
    x = ctx.as_qvalue(ctx.int_arg(source), f"{node.name}/x_q")
    out_hw = tuple(ctx.shape(source)[2:])
    sums, _ = _window_sums(ctx, source, x, pool, out_hw)  # type: ignore[arg-type]
    divisor = int(pool.divisor_override)
    kernel = pair(pool.kernel_size)
    sum_bound = kernel[0] * kernel[1] * max(abs(x.lo), abs(x.hi))
    twice = ctx.op("Mul", [sums, _i64(ctx, 2, f"{node.name}/two")], f"{node.name}/twice")
    num = ctx.op("Add", [twice, _i64(ctx, divisor, f"{node.name}/d")], f"{node.name}/num")
    pooled = _floor_div(ctx, f"{node.name}/pool_round", num,
                        np.array(2 * sum_bound + divisor), np.array(2 * divisor))
    m, shift = int(module.m), int(module.shift)
    scaled = ctx.op("Mul", [pooled, _i64(ctx, m, f"{node.name}/m")], f"{node.name}/scaled")
    rounding = (1 << (shift - 1)) if shift > 0 else 0
    num = ctx.op("Add", [scaled, _i64(ctx, rounding, f"{node.name}/r")], f"{node.name}/rq_num")
    bound = (sum_bound // divisor + 1) * m + rounding
    codes = _floor_div(ctx, f"{node.name}/shift", num, np.array(bound), np.array(1 << shift))
    return _codes(ctx, node, codes, module.qmin, module.qmax, module.out_scale, clip=True)


@register(im.IntAvgPool2d)
def convert_avg_pool(ctx: Emitter, node: fx.Node) -> Value:
    """Exact window sums, ``div_half_up`` by torch's divisor; with ``divisor_override`` a
    :class:`SumValue` (the float window mean, rounded once by the ``Requantize`` after it)."""
    module = ctx.module(node)
    x = ctx.as_qvalue(ctx.int_arg(node), f"{node.name}/x_q")
    if module.divisor_override is None:
        return _div_half_up(ctx, node, x, module)
    kernel = pair(module.kernel_size)
    real = ctx.dequantize(x, x.scale, f"{node.name}/x_dq")
    pooled = ctx.op("AveragePool", [real], f"{node.name}/avgpool",
                    **_window_attrs(module, kernel), count_include_pad=1)
    area, divisor = kernel[0] * kernel[1], int(module.divisor_override)
    lo, hi = (x.lo * area) // divisor, -((-x.hi * area) // divisor)
    return SumValue(pooled, x.scale * divisor / area, min(lo, 0), max(hi, 0))


@register(im.IntAdaptiveAvgPool2d)
def convert_adaptive_avg_pool(ctx: Emitter, node: fx.Node) -> Value:
    """Exact bin sums (torch's bins, equal or not), ``div_half_up`` by each bin's size."""
    x = ctx.as_qvalue(ctx.int_arg(node), f"{node.name}/x_q")
    return _div_half_up(ctx, node, x, ctx.module(node))


@register(im.IntPoolRequantize)
def convert_pool_requantize(ctx: Emitter, node: fx.Node) -> Value:
    """Uneven average pool fused with its requantization: exact window sums, then the
    reference's ``(S m_p + 2^(s_p - 1)) >> s_p`` per output position, clip, container."""
    module = ctx.module(node)
    x = ctx.as_qvalue(ctx.int_arg(node), f"{node.name}/x_q")
    counts = module.counts.detach().cpu().numpy()
    sums, _ = _window_sums(ctx, node, x, module.pool, tuple(counts.shape))
    m = module.m.detach().cpu().numpy().astype(np.int64)
    shift = module.shift.detach().cpu().numpy().astype(np.int64)
    rounding = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0).astype(np.int64)
    num = ctx.op("Add", [ctx.op("Mul", [sums, _i64(ctx, m, f"{node.name}/m")],
                                f"{node.name}/scaled"), _i64(ctx, rounding, f"{node.name}/r")],
                 f"{node.name}/num")
    bound = counts.astype(np.int64) * max(abs(x.lo), abs(x.hi)) * m + rounding
    codes = _floor_div(ctx, f"{node.name}/shift", num, bound,
                       np.left_shift(np.ones_like(shift), shift))
    return _codes(ctx, node, codes, module.qmin, module.qmax, module.out_scale, clip=True)

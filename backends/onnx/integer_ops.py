"""QDQ converters of the integer modules (``djpq_compiler/ir/modules.py``).

Every integer op becomes the standard QDQ pattern onnxruntime fuses into integer kernels:
``DequantizeLinear`` on each integer input, the float op, ``QuantizeLinear`` at the output scale
(with a ``Clip`` first when the code range is narrower than its 8/16-bit container). Weights are
integer initializers (INT4 for ``w_bits <= 4``, INT8, INT16) dequantized per output channel;
the bias is the reference's int32 bias dequantized at ``in_scale * w_scale``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im

from .graph import Emitter, FValue, QValue, SumValue, Value, container, register

__all__ = ["pair", "weight_container"]


def pair(value: Any) -> tuple[int, int]:
    """An int or 1/2-sequence of ints as a pair."""
    if isinstance(value, int):
        return value, value
    vals = tuple(int(v) for v in value)
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


#: Largest pair sum ``a0*w0 + a1*w1`` of onnxruntime's AVX2 u8s8 kernels (``vpmaddubsw``
#: saturates its int16 pair sums; VNNI/ARM kernels do not).
_PAIR_LIMIT = 2**15 - 1


def weight_container(codes: np.ndarray, w_bits: int, x_hi: int = 0) -> tuple[int, str, int]:
    """``(TensorProto type, name, zero point)`` of a weight initializer.

    INT4 when ``w_bits <= 4``; INT8 otherwise, except UINT8 with zero point 128 (the same codes,
    shifted) when ``2 * x_hi * max|w|`` could saturate the int16 pair sums of onnxruntime's u8s8
    kernels on x86 without VNNI (``x_hi``: the input's peak as uint8; u8u8 kernels widen to 16
    bits first and are exact); INT16 above 8 bits.
    """
    from onnx import TensorProto

    peak = int(np.abs(codes).max(initial=0))
    if w_bits <= 4 and peak <= 7:
        return TensorProto.INT4, "INT4", 0
    if peak <= 127:
        if 2 * x_hi * peak > _PAIR_LIMIT and x_hi <= 255:
            return TensorProto.UINT8, "UINT8+128", 128
        return TensorProto.INT8, "INT8", 0
    if peak <= 32767:
        return TensorProto.INT16, "INT16", 0
    raise BackendError(f"weight codes up to {peak} do not fit int16")


def _np(t: torch.Tensor, dtype: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


def _dq_weight(ctx: Emitter, node: fx.Node, module: Any, codes: np.ndarray, axis: int,
               x: QValue | SumValue) -> str:
    """Per-channel DequantizeLinear of integer weight codes (``w_scale`` along ``axis``)."""
    from onnx import helper

    # onnxruntime (x86) runs int8 activations as uint8 with zero point 128: their u8 peak is hi+128
    x_hi = x.hi if x.lo >= 0 else (x.hi + 128 if x.lo >= -128 else 0)
    elem, kind, zero = weight_container(codes, module.w_bits, x_hi)
    dtypes = {"INT4": np.int8, "INT8": np.int8, "UINT8+128": np.uint8, "INT16": np.int16}
    w = ctx.const((codes + zero).astype(dtypes[kind]), f"{node.name}/weight", elem)
    scale = _np(module.w_scale, np.float32).reshape(-1)
    zp = ctx.fresh(f"{node.name}/weight_zero_point")
    ctx.layers.setdefault(node.name, {})["w_container"] = kind
    if scale.size == 1:
        ctx.initializers.append(helper.make_tensor(zp, elem, [], [zero]))
        s = ctx.scalar(float(scale[0]), f"{node.name}/weight_scale")
        return ctx.op("DequantizeLinear", [w, s, zp], f"{node.name}/weight_dq")
    ctx.initializers.append(helper.make_tensor(zp, elem, [scale.size], [zero] * scale.size))
    s = ctx.const(scale, f"{node.name}/weight_scale")
    return ctx.op("DequantizeLinear", [w, s, zp], f"{node.name}/weight_dq", axis=axis)


def _dq_bias(ctx: Emitter, node: fx.Node, module: Any) -> str:
    """The int32 bias dequantized at ``in_scale * w_scale / 2^acc_shift`` (per channel)."""
    bias = _np(module.bias, np.int64)
    if bias.size and (bias.min() < -(2**31) or bias.max() > 2**31 - 1):
        raise BackendError(f"{node.format_node()}: integer bias does not fit int32")
    k = int(getattr(module, "acc_shift", 0))
    scale = (module.in_scale * module.w_scale.detach().double().reshape(-1) / 2**k).numpy()
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
    b = ctx.const(bias.astype(np.int32), f"{node.name}/bias")
    s = ctx.const(scale, f"{node.name}/bias_scale")
    z = ctx.const(np.zeros(bias.shape, np.int32), f"{node.name}/bias_zero_point")
    return ctx.op("DequantizeLinear", [b, s, z], f"{node.name}/bias_dq", axis=0)


def _finish(ctx: Emitter, node: fx.Node, module: Any, real: str, x: QValue | SumValue) -> Value:
    """Float output (``out_scale is None``: ``+ out_bias``, the float bias, if any) or clip +
    QuantizeLinear; records the layer's bits."""
    ctx.layers.setdefault(node.name, {}).update({
        "kind": type(module).__name__, "w_bits": module.w_bits, "in_range": [x.lo, x.hi],
        "out_bits": None if module.out_scale is None else module.out_bits,
        "out_range": None if module.out_scale is None else [module.qmin, module.qmax],
    })
    if module.out_scale is None:
        out_bias = getattr(module, "out_bias", None)
        if out_bias is None or not bool(out_bias.abs().max() > 0):
            return FValue(ctx.op("Identity", [real], node.name))
        shape = (1, -1, 1, 1) if isinstance(module, im.IntConv2d) else (-1,)
        bias = ctx.const(_np(out_bias, np.float32).reshape(shape), f"{node.name}/out_bias")
        return FValue(ctx.op("Add", [real, bias], node.name))
    return ctx.quantize(real, module.out_scale, module.qmin, module.qmax, node.name)


@register(im.IntConv2d)
def convert_conv2d(ctx: Emitter, node: fx.Node) -> Value:
    """DQ(x) -> Conv(DQ(W), DQ(bias)) -> [Clip] -> Q(out_scale), or a float output."""
    module = ctx.module(node)
    x = ctx.int_arg(node)
    xf = ctx.dequantize(x, module.in_scale, f"{node.name}/x_dq")
    codes = _np(module.weight, np.int64)
    inputs = [xf, _dq_weight(ctx, node, module, codes, 0, x)]
    if module.bias.numel():
        inputs.append(_dq_bias(ctx, node, module))
    ph, pw = pair(module.padding)
    conv = ctx.op("Conv", inputs, f"{node.name}/conv", kernel_shape=list(codes.shape[2:]),
                  strides=list(pair(module.stride)), pads=[ph, pw, ph, pw],
                  dilations=list(pair(module.dilation)), group=int(module.groups))
    return _finish(ctx, node, module, conv, x)


@register(im.IntLinear)
def convert_linear(ctx: Emitter, node: fx.Node) -> Value:
    """DQ(x) -> Gemm(DQ(W), DQ(bias), transB=1) for 2-D inputs, else MatMul + Add."""
    module = ctx.module(node)
    x = ctx.int_arg(node)
    xf = ctx.dequantize(x, module.in_scale, f"{node.name}/x_dq")
    codes = _np(module.weight, np.int64)
    ndim = len(ctx.shape(node.args[0]))
    if ndim == 2:
        inputs = [xf, _dq_weight(ctx, node, module, codes, 0, x)]
        if module.bias.numel():
            inputs.append(_dq_bias(ctx, node, module))
        out = ctx.op("Gemm", inputs, f"{node.name}/gemm", transB=1)
    else:
        w_t = _dq_weight(ctx, node, module, np.ascontiguousarray(codes.T), 1, x)
        out = ctx.op("MatMul", [xf, w_t], f"{node.name}/matmul")
        if module.bias.numel():
            out = ctx.op("Add", [out, _dq_bias(ctx, node, module)], f"{node.name}/bias_add")
    return _finish(ctx, node, module, out, x)


@register(im.Quantize)
def convert_quantize(ctx: Emitter, node: fx.Node) -> Value:
    """``[Clip] -> QuantizeLinear`` (round half to even, as the reference)."""
    module = ctx.module(node)
    return ctx.quantize(ctx.real(node, node.args[0]), module.scale, module.qmin, module.qmax,
                        node.name)


@register(im.Dequantize)
def convert_dequantize(ctx: Emitter, node: fx.Node) -> Value:
    """``DequantizeLinear`` at the module's scale."""
    module = ctx.module(node)
    return FValue(ctx.dequantize(ctx.int_arg(node), module.scale, node.name))


@register(im.Requantize)
def convert_requantize(ctx: Emitter, node: fx.Node) -> Value:
    """DQ(x, in_scale) -> [Clip] -> Q(out_scale); after a window-sum pool (ties are common
    there) the reference's integer rounding instead (``pool_ops.requantize_pool_sum``)."""
    from .pool_ops import requantize_pool_sum

    exact = requantize_pool_sum(ctx, node)
    if exact is not None:
        return exact
    module = ctx.module(node)
    real = ctx.dequantize(ctx.int_arg(node), module.in_scale, f"{node.name}/x_dq")
    return ctx.quantize(real, module.out_scale, module.qmin, module.qmax, node.name)


@register(im.IntAdd)
def convert_add(ctx: Emitter, node: fx.Node) -> Value:
    """DQ(a) + DQ(b) -> [Clip] -> Q(out_scale)."""
    module = ctx.module(node)
    a = ctx.dequantize(ctx.int_arg(node, 0), module.a_scale, f"{node.name}/a_dq")
    b = ctx.dequantize(ctx.int_arg(node, 1), module.b_scale, f"{node.name}/b_dq")
    total = ctx.op("Add", [a, b], f"{node.name}/add")
    return ctx.quantize(total, module.out_scale, module.qmin, module.qmax, node.name)


@register(im.IntMul)
def convert_mul(ctx: Emitter, node: fx.Node) -> Value:
    """The reference's integer arithmetic, bit-exact: the int64 product of the codes,
    ``(p * m + 2^(shift-1)) >> shift`` (round half up; a float ``DQ * DQ -> Q`` rounds the many
    exact ``k + 1/2`` products half to even), clip, cast to the output's container."""
    from onnx import TensorProto

    module = ctx.module(node)
    a = ctx.as_qvalue(ctx.int_arg(node, 0), f"{node.name}/a_q")
    b = ctx.as_qvalue(ctx.int_arg(node, 1), f"{node.name}/b_q")
    a64 = ctx.op("Cast", [a.name], f"{node.name}/a_i64", to=TensorProto.INT64)
    b64 = ctx.op("Cast", [b.name], f"{node.name}/b_i64", to=TensorProto.INT64)
    product = ctx.op("Mul", [a64, b64], f"{node.name}/product")
    bound = max(abs(a.lo), abs(a.hi)) * max(abs(b.lo), abs(b.hi))
    codes = _round_shift(ctx, node, product, bound, int(module.m), int(module.shift))
    lo = ctx.const(np.array(module.qmin, np.int64), f"{node.name}/qmin")
    hi = ctx.const(np.array(module.qmax, np.int64), f"{node.name}/qmax")
    codes = ctx.op("Min", [ctx.op("Max", [codes, lo], f"{node.name}/max"), hi],
                   f"{node.name}/min")
    elem, _, _ = container(module.qmin, module.qmax)
    return QValue(ctx.op("Cast", [codes], node.name, to=elem), module.out_scale, module.qmin,
                  module.qmax)


def _round_shift(ctx: Emitter, node: fx.Node, acc: str, bound: int, m: int, shift: int) -> str:
    """``floor((acc * m + R) / 2^shift)`` in int64 for ``|acc| <= bound`` (``R = 2^(shift-1)``).

    ONNX's ``BitShift`` takes unsigned types only and integer ``Div`` truncates, so the value is
    offset by ``K * 2^shift`` to be non-negative (where truncation is the floor), divided, and
    ``K`` subtracted again."""
    scaled = ctx.op("Mul", [acc, ctx.const(np.array(m, np.int64), f"{node.name}/m")],
                    f"{node.name}/scaled")
    if shift == 0:
        return scaled
    rounding, step = 1 << (shift - 1), 1 << shift
    k = (bound * m + rounding) // step + 1
    if 2 * (bound * m + rounding) + step >= 2**63:
        raise BackendError(f"{node.format_node()}: |product| * m up to {bound * m} leaves no "
                           "int64 room for the exact requantization")
    offset = ctx.const(np.array(rounding + k * step, np.int64), f"{node.name}/offset")
    total = ctx.op("Add", [scaled, offset], f"{node.name}/offset_add")
    quotient = ctx.op("Div", [total, ctx.const(np.array(step, np.int64), f"{node.name}/step")],
                      f"{node.name}/shift")
    return ctx.op("Sub", [quotient, ctx.const(np.array(k, np.int64), f"{node.name}/k")],
                  f"{node.name}/unoffset")


@register(im.IntConcat)
def convert_concat(ctx: Emitter, node: fx.Node) -> Value:
    """DQ(x_k, s_k) for each input -> Concat -> [Clip] -> Q(out_scale)."""
    module = ctx.module(node)
    parts = [ctx.dequantize(ctx.int_arg(node, i), module.in_scales[i], f"{node.name}/in{i}_dq")
             for i in range(len(node.args))]
    ndim = len(ctx.shape(node))
    cat = ctx.op("Concat", parts, f"{node.name}/concat", axis=module.dim % ndim)
    return ctx.quantize(cat, module.out_scale, module.qmin, module.qmax, node.name)


@register(im.IntClip)
def convert_clip(ctx: Emitter, node: fx.Node) -> Value:
    """``clamp(q, lo, hi)`` as DQ -> Clip -> Q at the same scale."""
    module = ctx.module(node)
    x = ctx.int_arg(node)
    lo = min(max(x.lo, module.lo), module.hi)
    hi = min(max(x.hi, module.lo), module.hi)
    real = ctx.dequantize(x, x.scale, f"{node.name}/x_dq")
    return ctx.quantize(real, x.scale, lo, hi, node.name)


def _window_attrs(module: Any, kernel: tuple[int, int]) -> dict[str, Any]:
    stride = module.stride if module.stride not in (None, (), []) else kernel
    ph, pw = pair(module.padding)
    return {"kernel_shape": list(kernel), "strides": list(pair(stride)),
            "pads": [ph, pw, ph, pw], "ceil_mode": int(bool(module.ceil_mode))}


@register(im.IntMaxPool2d)
def convert_max_pool(ctx: Emitter, node: fx.Node) -> Value:
    """DQ -> MaxPool -> Q at the same scale (exact; onnxruntime runs it on int8/uint8)."""
    module = ctx.module(node)
    x = ctx.as_qvalue(ctx.int_arg(node), f"{node.name}/x_q")
    kernel = pair(module.kernel_size)
    real = ctx.dequantize(x, x.scale, f"{node.name}/x_dq")
    pooled = ctx.op("MaxPool", [real], f"{node.name}/maxpool", **_window_attrs(module, kernel),
                    dilations=list(pair(module.dilation)))
    return ctx.quantize(pooled, x.scale, x.lo, x.hi, node.name)


def adaptive_windows(node: fx.Node, in_hw: Sequence[int], output_size: Any) -> tuple[int, int]:
    """Kernel (= stride) of an adaptive pool whose bins are equal, else a BackendError."""
    out = pair(tuple(o if o is not None else i for o, i in
                     zip(pair(output_size), in_hw, strict=True)))
    if any(i % o for i, o in zip(in_hw, out, strict=True)):
        raise BackendError(f"{node.format_node()}: adaptive pooling {tuple(in_hw)} -> {out} has "
                           "unequal bins; only output sizes dividing the input are exported")
    return in_hw[0] // out[0], in_hw[1] // out[1]


# ------------------------------------------------------------------------------ lookup tables


@register(im.IntLUT)
def convert_lut(ctx: Emitter, node: fx.Node) -> Value:
    """``table[q - in_qmin]``: Cast(int32) -> [Sub in_qmin] -> ``Gather`` on an integer table
    stored in the output's container type (exact in onnxruntime)."""
    from onnx import TensorProto, helper

    module = ctx.module(node)
    x = ctx.as_qvalue(ctx.int_arg(node), f"{node.name}/x_q")
    if x.lo < module.in_qmin or x.hi > module.in_qmax:
        raise BackendError(f"{node.format_node()}: input codes [{x.lo}, {x.hi}] exceed the "
                           f"table's [{module.in_qmin}, {module.in_qmax}]")
    index = ctx.op("Cast", [x.name], f"{node.name}/index", to=TensorProto.INT32)
    if module.in_qmin:
        offset = ctx.const(np.array(module.in_qmin, np.int32), f"{node.name}/in_qmin")
        index = ctx.op("Sub", [index, offset], f"{node.name}/offset")
    elem, _, _ = container(module.qmin, module.qmax)
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    table = ctx.const(module.table.detach().cpu().numpy().astype(np_type), f"{node.name}/table",
                      elem)
    out = ctx.op("Gather", [table, index], node.name, axis=0)
    return QValue(out, module.out_scale, module.qmin, module.qmax)

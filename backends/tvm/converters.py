"""Converters of the integer modules (``djpq_compiler/ir/modules.py``) to Relax.

Each converter reproduces the reference executor bit for bit (``docs/integer_semantics.md``):
integer conv/matmul accumulating in int32 (int64 where the weight-derived bound needs it), dyadic
requantization ``(acc * m + 2^(shift-1)) >> shift`` in int64, clips, and average pools as exact
window sums followed by ``floor((2S + c) / (2c))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im

from .emit import FloatValue, IntValue, LaneChain, Lowered, Lowering, container_dtype, register
from .kernels.eltwise import Clamp, Expr, Leaf, Requant, Sum, split_multiplier, value_range
from .kernels.select import (
    GROUPED_KINDS,
    KernelChoice,
    LayerFacts,
    fit_groups_to_lanes,
    merge_groups,
    narrow_pixels,
    select_kernel,
    winograd,
)
from .layout import NCHW, Layout, packed_channel_const, to_packed

INT32_MAX = 2**31 - 1
#: Strides at which a 1x1 conv on packed u8 input lowers its P so that it reads the blocks without
#: a pack stage (AVX2's ``NCHW8c``: ``select.fit_groups_to_lanes``); at other strides it keeps the
#: selected P (and reads directly only where that P fits the lanes, as VNNI's does). At stride 2
#: a pack stage that keeps P = 4 measured 1.10-1.98x faster per layer on AVX2 than the direct read
#: at P = 2, which uses every other pixel of each packed row (``strided_1x1_ab.py``).
DIRECT_READ_STRIDES = ((1, 1),)


def _np(value: Any) -> np.ndarray:
    """An int/tensor parameter as an int64 numpy array."""
    if torch.is_tensor(value):
        return value.detach().cpu().to(torch.int64).numpy()
    return np.asarray(value, dtype=np.int64)


def _channel_const(ctx: Lowering, value: np.ndarray, ndim: int, dtype: str,
                   layout: Layout = NCHW) -> Any:
    """A per-channel (dim 1) or per-tensor constant, as the reference's ``channel_view``; for a
    packed ``layout``, shaped ``(1, CB, 1, 1, L)`` (padding lanes 0)."""
    flat = value.reshape(-1)
    if flat.size == 1 or bool(np.all(flat == flat[0])):
        return ctx.bb.const(flat[0], dtype)
    if layout.packed:
        return ctx.bb.const(packed_channel_const(flat, layout), dtype)
    return ctx.bb.const(flat.reshape((1, -1) + (1,) * (ndim - 2)), dtype)


def requantize(ctx: Lowering, acc: Any, m: Any, shift: Any,
               qmin: int | None = None, qmax: int | None = None,
               per_position: bool = False, layout: Layout = NCHW) -> Any:
    """``clip(((acc * m + R) >> shift), qmin, qmax)`` in int64, ``R = 2^(shift-1)`` (0 if 0).

    ``m``/``shift`` are per tensor or per channel (dim 1; the channel blocks and lanes of a
    packed ``layout``), or with ``per_position`` arrays shaped like the trailing dims of ``acc``
    (one multiplier per output position)."""
    ndim = len(ctx.bb.shape(acc))
    m_np, shift_np = _np(m), _np(shift)
    rounding = np.where(shift_np > 0, np.left_shift(1, np.maximum(shift_np - 1, 0)), 0)

    def const(value: np.ndarray) -> Any:
        if per_position:
            return ctx.bb.const(value, "int64")
        return _channel_const(ctx, value, ndim, "int64", layout)

    acc64 = ctx.bb.astype(acc, "int64")
    prod = ctx.bb.binary("multiply", acc64, const(m_np))
    prod = ctx.bb.binary("add", prod, const(rounding))
    out = ctx.bb.binary("right_shift", prod, const(shift_np))
    if qmin is None and qmax is None:
        return out
    lo = -(2**63) if qmin is None else qmin
    hi = 2**63 - 1 if qmax is None else qmax
    return ctx.bb.clip(out, lo, hi)


def _operand_dtypes(x: IntValue, w_lo: int, w_hi: int) -> tuple[str, str]:
    """Data/weight dtypes of an integer conv/matmul: native u8/s8 x s8, else a common type."""
    x_dtype, w_dtype = container_dtype(x.lo, x.hi), container_dtype(min(w_lo, -1), w_hi)
    if x_dtype in ("uint8", "int8") and w_dtype == "int8":
        return x_dtype, w_dtype
    common = container_dtype(min(x.lo, w_lo, -1), max(x.hi, w_hi))
    common = "int32" if common in ("uint16", "uint8") else common
    return common, common


def _accumulate_dtype(x: IntValue, weight: np.ndarray, bias: np.ndarray,
                      acc_shift: int = 0) -> str:
    """int32 if ``max_o sum|w_o| * max|x| * 2^acc_shift + max|bias|`` fits it, else int64 (from
    weights only)."""
    per_out = np.abs(weight.reshape(weight.shape[0], -1)).sum(axis=1)
    bound = (int(per_out.max(initial=0)) * max(abs(x.lo), abs(x.hi))) << acc_shift
    bound += int(np.abs(bias).max(initial=0))
    return "int32" if bound <= INT32_MAX else "int64"


def _add_bias(ctx: Lowering, module: im._IntLayer, acc: Any, bias: np.ndarray, shape: tuple,
              acc_dtype: str) -> Any:
    """``acc * 2^acc_shift + bias`` (the reference's ``_IntLayer._add_bias``)."""
    k = int(getattr(module, "acc_shift", 0))
    if k:
        acc = ctx.bb.binary("multiply", acc, ctx.bb.const(np.array(1 << k), acc_dtype))
    if bias.size and np.any(bias):
        acc = ctx.bb.binary("add", acc, ctx.bb.const(bias.reshape(shape), acc_dtype))
    return acc


def _finish_layer(ctx: Lowering, module: im._IntLayer, acc: Any) -> Lowered:
    """Requantize + clip (integer output) or ``acc * s_x * s_w`` (float output), per channel."""
    if module.out_scale is None:
        ndim = len(ctx.bb.shape(acc))
        scale = (module.in_scale * module.w_scale.detach().cpu().double()).numpy()
        shape = (1, -1) + (1,) * (ndim - 2) if scale.size > 1 else ()
        real = ctx.bb.binary("multiply", ctx.bb.astype(acc, "float64"),
                             ctx.bb.const(scale.reshape(shape), "float64"))
        out_bias = getattr(module, "out_bias", None)
        if out_bias is not None and bool(out_bias.abs().max() > 0):
            bias = out_bias.detach().cpu().double().numpy()
            real = ctx.bb.binary("add", real, ctx.bb.const(bias.reshape(shape), "float64"))
        return FloatValue(ctx.bb.astype(real, "float32"))
    out = requantize(ctx, acc, module.m, module.shift, module.qmin, module.qmax)
    return ctx.int_value(out, module.qmin, module.qmax)


def _pair(value: Any) -> tuple[int, int]:
    """An int or 1/2-sequence of ints as a pair (rejecting ``"same"``-style strings)."""
    if isinstance(value, int):
        return value, value
    vals = tuple(value)
    if not vals or not all(isinstance(v, int) for v in vals):
        raise BackendError(f"expected ints or a pair of ints, got {value!r}")
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


def _select(ctx: Lowering, node: fx.Node, op: str, x: IntValue, weight: np.ndarray,
            bias: np.ndarray, groups: int, macs: int) -> tuple[LayerFacts, KernelChoice]:
    """Pick (and record on ``ctx.kernels``) the kernel of one integer conv/linear layer."""
    from .kernels.emit import target_features, target_text

    module = ctx.module(node)
    packed_io = (op == "conv2d" and x.layout.packed and ctx.plan.wants_packed(node)
                 and module.out_scale is not None)  # AMX's threshold depends on it
    facts = LayerFacts(node.name, op, x.lo, x.hi, weight, bias,
                       int(getattr(module, "acc_shift", 0)), groups, macs,
                       target_features(ctx.target), target_text(ctx.target), packed_io)
    # packed on either side: merged groups fill whole lane blocks where that is cheap enough
    lanes = ctx.plan.lanes if x.layout.packed or ctx.plan.wants_packed(node) else 0
    merged, k = merge_groups(facts, lanes)
    choice = select_kernel(merged)
    if k > 1 and choice.kind is not None:  # else the default lowering of the layer as it is
        facts = merged
    ctx.kernels.append(choice)
    return facts, choice


def _merge_note(choice: KernelChoice, weight: np.ndarray, groups: int,
                facts: LayerFacts) -> KernelChoice:
    """``choice`` noting that its kernel runs ``facts``' groups, merged block-diagonally from the
    layer's ``groups`` (``select.merge_groups``), when they were (after the selection's last
    rewrite of the note)."""
    if facts.groups == groups or choice.kind is None:
        return choice
    k, in_g, out_g = groups // facts.groups, weight.shape[1], weight.shape[0] // groups
    return dataclasses.replace(choice, note=(
        f"{choice.note} ({groups} groups of {in_g} -> {out_g} channels merged {k} at a time "
        f"into {facts.groups} block-diagonal group{'s' if facts.groups > 1 else ''}: {k}x the "
        "multiply-adds)"))


def _written_layer(ctx: Lowering, node: fx.Node, x: IntValue, facts: LayerFacts,
                   choice: KernelChoice, geometry: Any, out_lanes: int = 0) -> tuple[Any, Layout]:
    """Emit a written kernel: fused requantization (integer out) or the int32 accumulator.

    Dense and depthwise kernels read ``x`` in its layout and write ``NCHW{out_lanes}c`` where
    they can (``out_lanes`` > 0). A grouped (non-depthwise) conv runs one dense kernel over the
    batch of images x groups (``select.GROUPED_KINDS``, ``ConvKernelSpec.conv_groups``).
    The layer's record (the last of ``ctx.kernels``) notes how the kernel finished its
    accumulators (``emit.epilogue_form``)."""
    from .kernels.emit import emit_conv

    module = ctx.module(node)
    requant = None
    if module.out_scale is not None:
        m, shift = _np(module.m).reshape(-1), _np(module.shift).reshape(-1)
        requant = (m, shift, module.qmin, module.qmax, container_dtype(module.qmin, module.qmax))
    out, layout, form = emit_conv(ctx.bb, x.expr, ctx.bb.dtype(x.expr), facts, choice, geometry,
                                  requant, x.layout, out_lanes)
    ctx.kernels[-1] = dataclasses.replace(ctx.kernels[-1], epilogue=form)
    return out, layout


def _written_result(ctx: Lowering, module: im._IntLayer, out: Any,
                    layout: Layout = NCHW) -> Lowered:
    """Wrap a written kernel's result: integer codes, or the float finish of the accumulator."""
    if module.out_scale is None:
        return _finish_layer(ctx, module, out)
    return IntValue(out, module.qmin, module.qmax, layout)


def _record_layouts(ctx: Lowering, index: int, in_layout: Layout, out_layout: Layout) -> None:
    """Note the layouts a written kernel read and wrote on its ``ctx.kernels`` record."""
    ctx.kernels[index] = dataclasses.replace(ctx.kernels[index], in_layout=str(in_layout),
                                             out_layout=str(out_layout))


@register(im.IntConv2d)
def convert_conv2d(ctx: Lowering, node: fx.Node) -> Lowered:
    """Integer conv2d (plain, depthwise, grouped) + int bias + per-channel requantization.

    A written kernel (``backends/tvm/kernels``) is used where the selection proves one exact for
    this layer's bits on the target; otherwise TVM's generic ``nn.conv2d``. Written dense and
    depthwise kernels read their input in any layout and write the packed layout where the
    layout plan asks for it (``layout.py``); everything else is NCHW."""
    module = ctx.module(node)
    x = ctx.packed_int_arg(node)
    weight, bias = _np(module.weight), _np(module.bias)
    try:
        stride, padding = _pair(module.stride), _pair(module.padding)
        dilation = _pair(module.dilation)
    except BackendError as exc:
        raise BackendError(f"{node.format_node()}: {exc}; convert() emits explicit int "
                           "paddings, rebuild the model with integer padding") from None
    n, _, h, w = ctx.bb.shape(x.expr)[:4]
    kh, kw = weight.shape[2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    facts, choice = _select(ctx, node, "conv2d", x, weight, bias, int(module.groups),
                            n * oh * ow * int(weight[0].size) * weight.shape[0])
    index = len(ctx.kernels) - 1
    depthwise = weight.shape[1] == 1 and int(module.groups) == weight.shape[0]
    if choice.kind is not None:
        # a grouped kernel reads packed input where each group fills whole blocks, else NCHW
        if int(module.groups) != 1 and not depthwise and not (
                choice.kind in GROUPED_KINDS and x.layout.packed
                and facts.weight.shape[1] % x.layout.lanes == 0):
            x = ctx.int_arg(node)
        direct = (x.layout.packed and (kh, kw) == (1, 1) and padding == (0, 0)
                  and stride in DIRECT_READ_STRIDES and x.lo >= 0
                  and container_dtype(x.lo, x.hi) == "uint8")
        if direct:
            choice = fit_groups_to_lanes(choice, facts, x.layout.lanes)
            ctx.kernels[index] = choice
        choice = narrow_pixels(choice, facts, stride, padding, ow, direct)
        choice = winograd(choice, facts, stride, dilation, (oh, ow))
        choice = _merge_note(choice, weight, int(module.groups), facts)
        ctx.kernels[index] = choice
        out_lanes = ctx.plan.lanes if ctx.plan.wants_packed(node) else 0
        out, layout = _written_layer(ctx, node, x, facts, choice, (stride, padding, dilation),
                                     out_lanes)
        _record_layouts(ctx, index, x.layout, layout)
        return _written_result(ctx, module, out, layout)
    x = ctx.int_arg(node)
    x_dtype, w_dtype = _operand_dtypes(x, int(weight.min()), int(weight.max()))
    acc_dtype = _accumulate_dtype(x, weight, bias, int(getattr(module, "acc_shift", 0)))
    if weight.shape[1] == 1 and (kh, kw) == (1, 1):  # one input channel per group
        acc = _depthwise_1x1(ctx, x.expr, weight, stride, padding + padding, acc_dtype)
    else:
        acc = ctx.bb.conv2d(ctx.bb.astype(x.expr, x_dtype), ctx.bb.const(weight, w_dtype),
                            stride, padding, dilation, int(module.groups), acc_dtype)
    acc = _add_bias(ctx, module, acc, bias, (1, -1, 1, 1), acc_dtype)
    return _finish_layer(ctx, module, acc)


def _depthwise_1x1(ctx: Lowering, x: Any, weight: np.ndarray, stride: tuple[int, int],
                   pads: tuple[int, int, int, int], acc_dtype: str) -> Any:
    """A 1x1 conv with one input channel per group (depthwise with ``M = O / C`` outputs per
    channel, or a dense conv of one input channel) as what it computes: every input channel
    times its ``M`` weights, ``out[:, c*M + j] = x[:, c] * w[c*M + j]``, after the zero padding
    ``pads`` (top, left, bottom, right) and the stride. Not ``nn.conv2d``: TVM 0.27 compiles an
    integer 1x1 ``conv2d`` with one input channel per group, fused with an ``add`` after it, to
    a kernel that adds the addend twice (every such case of a sweep over channels, groups,
    multipliers, strides and padding; no other conv shape). Found by the fuzzer through
    ``build(..., "cuda-emulated")``, whose depthwise layers take the generic lowering; pinned
    by ``tests/test_tvm_kernels.py``. Also the window sums of 1x1 average pools (``pools.py``)."""
    n, c, _, _ = ctx.bb.shape(x)
    x = ctx.bb.astype(x, acc_dtype)
    if any(pads):
        top, left, bottom, right = pads
        x = ctx.bb.call("nn.pad", x, [0, 0, 0, 0, top, bottom, left, right])
    if stride != (1, 1):
        h, w = ctx.bb.shape(x)[2:]
        x = ctx.bb.strided_slice(x, [2, 3], [0, 0], [h, w], list(stride))
    h, w = ctx.bb.shape(x)[2:]
    m = weight.shape[0] // c
    products = ctx.bb.binary("multiply", ctx.bb.reshape(x, (n, c, 1, h, w)),
                             ctx.bb.const(weight.reshape(1, c, m, 1, 1), acc_dtype))
    return ctx.bb.reshape(products, (n, c * m, h, w))


def _linear_as_conv(ctx: Lowering, node: fx.Node, x: IntValue, facts: LayerFacts,
                    choice: KernelChoice) -> Lowered:
    """``(N, in)`` linear as a 1x1 conv over ``(1, in, 1, N)``: the batch is the width tiled."""
    module = ctx.module(node)
    n, features = ctx.bb.shape(x.expr)
    as_image = ctx.bb.reshape(ctx.bb.permute(x.expr, (1, 0)), (1, features, 1, n))
    conv_facts = LayerFacts(facts.layer, facts.op, facts.act_lo, facts.act_hi,
                            facts.weight.reshape(facts.weight.shape + (1, 1)), facts.bias,
                            facts.acc_shift, 1, facts.macs, facts.features, facts.target)
    out, _ = _written_layer(ctx, node, IntValue(as_image, x.lo, x.hi), conv_facts, choice,
                            ((1, 1), (0, 0), (1, 1)))
    out = ctx.bb.permute(ctx.bb.reshape(out, (facts.weight.shape[0], n)), (1, 0))
    return _written_result(ctx, module, out)


@register(im.IntLinear)
def convert_linear(ctx: Lowering, node: fx.Node) -> Lowered:
    """Integer linear on ``(..., in)`` codes: the leading dims (batch, tokens) are flattened
    into the rows of one 2-D layer and restored after, as the reference's ``IntLinear``, so
    requantization and bias stay on the output channels (the last dim) at any rank."""
    x = ctx.int_arg(node)
    shape = ctx.bb.shape(x.expr)
    if len(shape) == 2:
        return _linear_2d(ctx, node, x)
    rows = IntValue(ctx.bb.reshape(x.expr, (int(np.prod(shape[:-1])), shape[-1])), x.lo, x.hi)
    out = _linear_2d(ctx, node, rows)
    out_shape = tuple(shape[:-1]) + (int(ctx.module(node).weight.shape[0]),)
    if isinstance(out, IntValue):
        return IntValue(ctx.bb.reshape(out.expr, out_shape), out.lo, out.hi)
    if isinstance(out, FloatValue):
        return FloatValue(ctx.bb.reshape(out.expr, out_shape))
    raise BackendError(f"{node.format_node()}: integer linear lowered to {type(out).__name__}")


def _linear_2d(ctx: Lowering, node: fx.Node, x: IntValue) -> Lowered:
    """Integer linear: ``x @ w.T`` accumulating in int32/int64, bias on the last dim.

    2-D inputs take a written kernel (a 1x1 conv over the batch) where one is provably exact."""
    module = ctx.module(node)
    weight, bias = _np(module.weight), _np(module.bias)
    shape = ctx.bb.shape(x.expr)
    rows = int(np.prod(shape[:-1]))
    facts, choice = _select(ctx, node, "linear", x, weight, bias, 1, rows * weight.size)
    if choice.kind is not None and len(shape) != 2:
        choice = KernelChoice(choice.layer, "linear", "default", "-",
                              f"{len(shape)}-D input: written linear kernels take (N, in) only",
                              choice.macs)
        ctx.kernels[-1] = choice
    if choice.kind is not None:
        return _linear_as_conv(ctx, node, x, facts, choice)
    x_dtype, w_dtype = _operand_dtypes(x, int(weight.min()), int(weight.max()))
    acc_dtype = _accumulate_dtype(x, weight, bias, int(getattr(module, "acc_shift", 0)))
    acc = ctx.bb.matmul(ctx.bb.astype(x.expr, x_dtype),
                        ctx.bb.const(np.ascontiguousarray(weight.T), w_dtype), acc_dtype)
    acc = _add_bias(ctx, module, acc, bias, (-1,), acc_dtype)
    return _finish_layer(ctx, module, acc)


@register(im.Quantize)
def convert_quantize(ctx: Lowering, node: fx.Node) -> Lowered:
    """``clip(round_half_even(x / scale))`` with the division in float32, as the reference."""
    module = ctx.module(node)
    x = ctx.value(node.args[0])
    if not isinstance(x, FloatValue):
        raise BackendError(f"{node.format_node()}: Quantize expects a float tensor")
    scaled = ctx.bb.binary("divide", x.expr, ctx.bb.const(np.float32(module.scale), "float32"))
    codes = ctx.bb.clip(ctx.bb.unary("round", scaled), module.qmin, module.qmax)
    return ctx.int_value(codes, module.qmin, module.qmax)


@register(im.Dequantize)
def convert_dequantize(ctx: Lowering, node: fx.Node) -> Lowered:
    """``float32(q) * float32(scale)``."""
    module = ctx.module(node)
    q = ctx.int_arg(node)
    real = ctx.bb.astype(q.expr, "float32")
    return FloatValue(ctx.bb.binary("multiply", real,
                                    ctx.bb.const(np.float32(module.scale), "float32")))


def _lanewise_args(ctx: Lowering, node: fx.Node, count: int) -> list[IntValue]:
    """The ``count`` integer inputs of a lane-wise op: as they are when all share one packed
    layout and one shape (the op then runs on the packed values, padding lanes included, which
    stay padding), else all in NCHW."""
    raw = [ctx.packed_int_arg(node, i) for i in range(count)]
    first = raw[0]
    if first.layout.packed and all(
            v.layout == first.layout and ctx.bb.shape(v.expr) == ctx.bb.shape(first.expr)
            for v in raw):
        return raw
    return [ctx.int_arg(node, i) for i in range(count)]


@register(im.IntAdd)
def convert_add(ctx: Lowering, node: fx.Node) -> Lowered:
    """TFLite-style add: both inputs to the intermediate scale, sum, requantize + clip.
    Lane-wise: part of a fused chain (:func:`_finish_chain`)."""
    module = ctx.module(node)
    p = module.params
    leaves: list[fx.Node] = []
    ops: list[str] = []
    a = _chain_input(ctx, node, 0, leaves, ops)
    b = _chain_input(ctx, node, 1, leaves, ops)
    tree = Requant(Sum(Requant(a, int(p.a_m), int(p.a_shift)),
                       Requant(b, int(p.b_m), int(p.b_shift))),
                   int(p.out_m), int(p.out_shift), module.qmin, module.qmax)
    return _finish_chain(ctx, node, tree, leaves, ops, module.qmin, module.qmax)


def _broadcast_operand(ctx: Lowering, value: IntValue, layout: Layout) -> Any | None:
    """``value`` (NCHW) as an operand broadcasting against a packed value of ``layout``: one
    value (reshaped to 5-D), a per-channel ``[N|1, C, 1, 1]`` one packed (padding lanes 0), or
    ``None`` when it has no such form."""
    shape = ctx.bb.shape(value.expr)
    if all(d == 1 for d in shape):
        return ctx.bb.reshape(value.expr, (1,) * 5)
    if len(shape) == 4 and shape[1] == layout.channels and shape[2:] == (1, 1):
        return to_packed(ctx.bb, value.expr, layout)
    return None


def _mul_args(ctx: Lowering, node: fx.Node) -> tuple[Any, Any, IntValue, IntValue, Layout]:
    """The operands of ``IntMul`` as expressions and their layout: as they are when both share
    one layout, packed when one is packed and the other broadcasts over ``H, W``
    (:func:`_broadcast_operand`), else both NCHW."""
    a, b = ctx.packed_int_arg(node, 0), ctx.packed_int_arg(node, 1)
    shapes = zip(ctx.bb.shape(a.expr), ctx.bb.shape(b.expr), strict=False)
    if a.layout == b.layout and (not a.layout.packed  # packed: broadcasting over N, H, W only
                                 or all(x == y or 1 in (x, y) for x, y in shapes)):
        return a.expr, b.expr, a, b, a.layout
    for big, small, swap in ((a, b, False), (b, a, True)):
        if big.layout.packed and not small.layout.packed:
            operand = _broadcast_operand(ctx, small, big.layout)
            if operand is not None:
                pair = (operand, big.expr) if swap else (big.expr, operand)
                return pair[0], pair[1], a, b, big.layout
    a, b = ctx.int_arg(node, 0), ctx.int_arg(node, 1)
    return a.expr, b.expr, a, b, NCHW


def _requantize_narrow(ctx: Lowering, x: Any, x_range: tuple[int, int], m: int, shift: int,
                       qmin: int, qmax: int) -> Any:
    """``clip((x*m + R) >> shift)`` in int32 where :func:`split_multiplier` proves a form exact
    on ``x_range`` (``kernels/eltwise.py``), else :func:`requantize` (int64)."""
    split = split_multiplier(x_range[0], x_range[1], m, shift, qmin, qmax)
    if split is None or container_dtype(*x_range) == "int64":
        return requantize(ctx, x, m, shift, qmin, qmax)

    def i32(value: int) -> Any:
        return ctx.bb.const(np.int32(value), "int32")

    x = ctx.bb.astype(x, "int32")
    out = ctx.bb.binary("add", ctx.bb.binary("multiply", x, i32(split.mh)), i32(split.add))
    if split.correction:
        low = ctx.bb.binary("right_shift", ctx.bb.binary("multiply", x, i32(split.ml)),
                            i32(split.u))
        out = ctx.bb.binary("add", out, low)
    if split.shift:
        out = ctx.bb.binary("right_shift", out, i32(split.shift))
    return ctx.bb.clip(out, qmin, qmax)


@register(im.IntMul)
def convert_mul(ctx: Lowering, node: fx.Node) -> Lowered:
    """Broadcasting product of the codes, requantized by one dyadic multiplier + clip: in
    int32 where the code ranges prove it exact (else int64). Lane-wise on packed values,
    including a packed ``x`` times a per-channel gate (squeeze-excite; ``layout.py``)."""
    module = ctx.module(node)
    a_expr, b_expr, a, b, layout = _mul_args(ctx, node)
    corners = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
    p_range = (min(corners), max(corners))
    p_dtype = "int32" if container_dtype(*p_range) != "int64" else "int64"
    product = ctx.bb.binary("multiply", ctx.bb.astype(a_expr, p_dtype),
                            ctx.bb.astype(b_expr, p_dtype))
    if p_dtype == "int32":
        out = _requantize_narrow(ctx, product, p_range, int(module.m), int(module.shift),
                                 module.qmin, module.qmax)
    else:
        out = requantize(ctx, ctx.bb.astype(product, "int64"), module.m, module.shift,
                         module.qmin, module.qmax)
    return ctx.int_value(out, module.qmin, module.qmax, layout)


def _rescale_part(ctx: Lowering, node: fx.Node, index: int, x: IntValue,
                  rescale: tuple[int, int] | None, qmin: int, qmax: int) -> Any:
    """Concat input ``index`` moved to the output scale: requantize (or not) and clip, in the
    output's container.

    On CPU targets a part that needs arithmetic is its own lane-wise kernel
    (:func:`_chain_kernel`), so that the concat only copies and casts: TVM 0.27's LLVM code for
    a concat fused with three int64 requantizations gave wrong codes on AVX-512 (the fuzzer,
    seed 27: parts of 3, 1 and 4 channels, shifts 31, 33 and 32; one part's codes wrong, each
    part alone and any two of them right, AVX2 right; ``tests/test_fuzz.py``)."""
    target = container_dtype(qmin, qmax)
    if rescale is None and qmin <= x.lo and x.hi <= qmax:
        return ctx.bb.astype(x.expr, target)
    leaf = Leaf(0, x.lo, x.hi, ctx.bb.dtype(x.expr))
    tree: Expr = (Clamp(leaf, max(min(x.lo, qmax), qmin), min(max(x.hi, qmin), qmax))
                  if rescale is None else Requant(leaf, rescale[0], rescale[1], qmin, qmax))
    if chains_enabled(ctx):
        part = _chain_kernel(ctx, node, tree, [x], [f"{node.name}[{index}]"], value_range(tree),
                             name=f"fused_eltwise_{node.name}_{index}")
        return ctx.bb.astype(part.expr, target)
    return ctx.bb.astype(_relax_tree(ctx, tree, [x.expr], x.layout), target)


def _concat_args(ctx: Lowering, node: fx.Node, dim: int) -> tuple[list[IntValue], int, Layout]:
    """The inputs of a concat along NCHW ``dim``, the axis to concatenate and the result's
    layout: packed on the channel blocks when every input has the same lanes and all but the
    last fill whole blocks (``C % L == 0``), packed along ``N``/``H``/``W`` when every input has
    one layout, else NCHW."""
    raw = [ctx.packed_int_arg(node, i) for i in range(len(node.args))]
    first = raw[0].layout
    if first.packed and all(v.layout.lanes == first.lanes for v in raw):
        axis = dim % 4
        if axis == 1 and all(v.layout.channels % first.lanes == 0 for v in raw[:-1]):
            return raw, 1, Layout(first.lanes, sum(v.layout.channels for v in raw))
        if axis != 1 and all(v.layout == first for v in raw):
            return raw, axis, first
    xs = [ctx.int_arg(node, i) for i in range(len(node.args))]
    return xs, dim % len(ctx.bb.shape(xs[0].expr)), NCHW


@register(im.IntConcat)
def convert_concat(ctx: Lowering, node: fx.Node) -> Lowered:
    """Concatenation with each input rescaled to the output scale; on packed values when the
    channel offsets are block-aligned (:func:`_concat_args`)."""
    module = ctx.module(node)
    if len(node.args) != len(module.rescales):
        raise BackendError(f"{node.format_node()}: {len(node.args)} inputs but "
                           f"{len(module.rescales)} rescales")
    xs, axis, layout = _concat_args(ctx, node, module.dim)
    parts = [_rescale_part(ctx, node, i, x, r, module.qmin, module.qmax)
             for i, (x, r) in enumerate(zip(xs, module.rescales, strict=True))]
    return IntValue(ctx.bb.concat(parts, axis), module.qmin, module.qmax, layout)


@register(im.IntClip)
def convert_clip(ctx: Lowering, node: fx.Node) -> Lowered:
    """``clamp(q, lo, hi)`` (torch semantics, also for ``lo > hi``); lane-wise (any layout),
    part of a fused chain."""
    module = ctx.module(node)
    leaves: list[fx.Node] = []
    ops: list[str] = []
    x = _chain_input(ctx, node, 0, leaves, ops)
    x_lo, x_hi = value_range(x)
    lo, hi = module.lo, module.hi
    new_lo, new_hi = min(max(x_lo, lo), hi), min(max(x_hi, lo), hi)
    return _finish_chain(ctx, node, Clamp(x, new_lo, new_hi), leaves, ops, new_lo, new_hi)


def _strides(kernel: tuple[int, int], stride: Sequence[int] | None) -> tuple[int, int]:
    return kernel if stride is None or len(stride) == 0 else _pair(stride)


@register(im.IntMaxPool2d)
def convert_max_pool(ctx: Lowering, node: fx.Node) -> Lowered:
    """Max pooling on the codes (exact; padded positions never win); lane-wise over the
    spatial dims, so a packed input stays packed (Relax's ``NCHW{L}c`` pool layout)."""
    module = ctx.module(node)
    (x,) = _lanewise_args(ctx, node, 1)
    kernel = _pair(module.kernel_size)
    window = (kernel, _strides(kernel, module.stride), _pair(module.padding),
              _pair(module.dilation), bool(module.ceil_mode))
    if x.layout.packed:
        out = ctx.bb.call("nn.max_pool2d", x.expr, *window, layout=str(x.layout))
    else:
        out = ctx.bb.max_pool2d(x.expr, *window)
    return IntValue(out, x.lo, x.hi, x.layout)


@register(im.Requantize)
def convert_requantize(ctx: Lowering, node: fx.Node) -> Lowered:
    """Codes moved to another scale: ``clip((q * m + R) >> shift)``; lane-wise (any layout),
    part of a fused chain."""
    module = ctx.module(node)
    leaves: list[fx.Node] = []
    ops: list[str] = []
    x = _chain_input(ctx, node, 0, leaves, ops)
    tree = Requant(x, int(module.m), int(module.shift), module.qmin, module.qmax)
    return _finish_chain(ctx, node, tree, leaves, ops, module.qmin, module.qmax)


# --------------------------------------------------------------- fused lane-wise chains

#: The lane-wise per-tensor integer ops fused into one kernel (``kernels/eltwise.py``).
CHAIN_OPS = (im.IntAdd, im.Requantize, im.IntClip)


def chains_enabled(ctx: Lowering) -> bool:
    """Fused lane-wise kernels are written for CPU (``llvm``) targets only."""
    return ctx.target is not None and ctx.target.get("kind") == "llvm"


def _defers(ctx: Lowering, node: fx.Node) -> bool:
    """A chain op is deferred (not emitted yet) when its only user is another chain op."""
    users = list(node.users)
    if not chains_enabled(ctx) or len(users) != 1 or users[0].op != "call_module":
        return False
    return isinstance(ctx.gm.get_submodule(str(users[0].target)), CHAIN_OPS)


def _leaf(leaves: list[fx.Node], node: fx.Node) -> int:
    if node not in leaves:
        leaves.append(node)
    return leaves.index(node)


def _reindex(tree: Expr, mapping: list[int]) -> Expr:
    """``tree`` with leaf ``i`` renumbered ``mapping[i]``."""
    if isinstance(tree, Leaf):
        return dataclasses.replace(tree, index=mapping[tree.index])
    if isinstance(tree, Sum):
        return Sum(_reindex(tree.a, mapping), _reindex(tree.b, mapping))
    return dataclasses.replace(tree, child=_reindex(tree.child, mapping))


def _chain_input(ctx: Lowering, node: fx.Node, index: int, leaves: list[fx.Node],
                 ops: list[str]) -> Expr:
    """Input ``index`` of a chain op as a tree: a deferred chain's tree (its leaves merged into
    ``leaves``), else a new leaf."""
    arg = node.args[index]
    value = ctx.env.get(arg) if isinstance(arg, fx.Node) else None
    if isinstance(value, LaneChain):
        ops.extend(value.ops)
        return _reindex(value.tree, [_leaf(leaves, n) for n in value.leaves])
    x = ctx.packed_int_arg(node, index)  # raises the usual error for non-integer inputs
    assert isinstance(arg, fx.Node)
    return Leaf(_leaf(leaves, arg), x.lo, x.hi, ctx.bb.dtype(x.expr))


def _finish_chain(ctx: Lowering, node: fx.Node, tree: Expr, leaves: list[fx.Node],
                  ops: list[str], lo: int, hi: int) -> Lowered:
    """Defer the chain (:func:`_defers`), or emit it: one written kernel on CPU targets when
    all inputs have one shape, else TVM's elementwise Relax ops (int64, fused by TVM).

    The inputs are read as they are when they share one layout and shape (packed values stay
    packed: the ops are per tensor, so padding lanes map to padding lanes), else all in NCHW."""
    ops = ops + [node.name]
    if _defers(ctx, node):
        return LaneChain(None, lo, hi, NCHW, tree, tuple(leaves), tuple(ops))
    values = [ctx.env[n] for n in leaves]
    first = values[0]
    shape = ctx.bb.shape(first.expr)
    if not (first.layout.packed and all(v.layout == first.layout and ctx.bb.shape(v.expr) == shape
                                        for v in values)):
        values = [ctx.plain_int(n) for n in leaves]
    layout = values[0].layout
    if chains_enabled(ctx) and all(ctx.bb.shape(v.expr) == ctx.bb.shape(values[0].expr)
                                   for v in values):
        return _chain_kernel(ctx, node, tree, values, ops, (lo, hi))
    out = _relax_tree(ctx, tree, [v.expr for v in values], layout)
    return ctx.int_value(out, lo, hi, layout)


def _chain_kernel(ctx: Lowering, node: fx.Node, tree: Expr, values: list[IntValue],
                  ops: list[str], out_range: tuple[int, int], name: str = "") -> IntValue:
    """Emit ``tree`` as one scheduled lane-wise kernel (``kernels/eltwise.py``: arithmetic, or a
    lookup in the chain's table where :func:`~.kernels.eltwise.chain_form` says) and record it;
    ``name`` defaults to ``fused_eltwise_<node>``."""
    from .adapter import make_target
    from .kernels.eltwise import (
        ChainRecord,
        build_chain_kernel,
        build_table_kernel,
        chain_form,
        chain_steps,
        prefers_int32,
        table_steps,
        tabulate,
        uses_gather,
    )

    assert ctx.target is not None  # chains_enabled
    shape = tuple(ctx.bb.shape(values[0].expr))
    out_dtype = container_dtype(*out_range)
    target = make_target(ctx.target)
    int32 = prefers_int32(target)
    form = chain_form(tree, out_dtype, int32, uses_gather(tree, shape, out_dtype, target))
    key = ("eltwise", tree, shape, out_dtype, form)
    named = ctx.bb.kernel_cache.get(key)
    if named is None:
        name = name or f"fused_eltwise_{node.name}"
        func = (build_table_kernel(tree, shape, out_dtype, target) if form == "table"
                else build_chain_kernel(tree, shape, out_dtype, target, int32))
        named = (name, func.with_attr("global_symbol", name).with_attr("op_pattern", 8))
        ctx.bb.kernel_cache[key] = named
    args = [v.expr for v in values]
    if form == "table":
        args.append(ctx.bb.const(tabulate(tree, out_dtype), out_dtype))
    out = ctx.bb.call_tir(named[1], named[0], args, shape, out_dtype)
    layout = values[0].layout
    steps = table_steps(tree, out_dtype) if form == "table" else chain_steps(tree, int32)
    ctx.eltwise.append(ChainRecord(named[0], tuple(ops), str(layout), shape, tuple(steps), tree,
                                   form))
    return IntValue(out, out_range[0], out_range[1], layout)


def _relax_tree(ctx: Lowering, tree: Expr, exprs: list[Any], layout: Layout) -> Any:
    """``tree`` as Relax elementwise ops, the reference's arithmetic step by step (int64
    requantizations; broadcasting operands allowed)."""
    if isinstance(tree, Leaf):
        return exprs[tree.index]
    if isinstance(tree, Sum):
        a = ctx.bb.astype(_relax_tree(ctx, tree.a, exprs, layout), "int64")
        b = ctx.bb.astype(_relax_tree(ctx, tree.b, exprs, layout), "int64")
        return ctx.bb.binary("add", a, b)
    child = _relax_tree(ctx, tree.child, exprs, layout)
    if isinstance(tree, Requant):
        return requantize(ctx, child, tree.m, tree.shift, tree.qmin, tree.qmax, layout=layout)
    c_lo, c_hi = value_range(tree.child)
    wide = container_dtype(min(c_lo, tree.lo), max(c_hi, tree.hi))
    return ctx.bb.clip(ctx.bb.astype(child, wide), tree.lo, tree.hi)

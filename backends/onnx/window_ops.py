"""Windowed attention and its data movement for the ONNX exporter: ``F.pad`` (constant),
``torch.roll``, ``torch.einsum`` and torchvision Swin's leaf functions ``_patch_merging_pad``,
``_get_relative_position_bias`` and ``shifted_window_attention`` (V1 and V2).

Same plans as ``backends/tvm/window_ops.py`` (``backends/common_ops.py``): padding, rolls,
window partition/merge, the bias gather and the shift mask are exact (``Pad``, ``Slice`` +
``Concat``, ``Reshape``/``Transpose``, ``Gather``, ``Add`` of a constant); the attention is a
float island (``MatMul``, ``Softmax``), a few float32 ulps from PyTorch, so codes after it agree
within 1 LSB. The batch dimension stays dynamic: merged batch dims are reshaped with ``-1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im

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
from .float_ops import _rewrap
from .graph import Emitter, FValue, QValue, SumValue, Value, container, register
from .shape_ops import batch_axes
from .transformer_ops import _linear

__all__: list[str] = []


def _ints(ctx: Emitter, values: list[int], hint: str) -> str:
    return ctx.const(np.array(values, np.int64), hint)


def _slice(ctx: Emitter, x: str, axes: list[int], starts: list[int], ends: list[int],
           hint: str, steps: list[int] | None = None) -> str:
    inputs = [x, _ints(ctx, starts, f"{hint}/starts"), _ints(ctx, ends, f"{hint}/ends"),
              _ints(ctx, axes, f"{hint}/axes")]
    if steps is not None:
        inputs.append(_ints(ctx, steps, f"{hint}/steps"))
    return ctx.op("Slice", inputs, hint)


def _pad(ctx: Emitter, x: QValue | FValue, widths: list[tuple[int, int]], fill: float,
         hint: str) -> QValue | FValue:
    """Constant ``Pad``; integer codes are padded with code 0 and their range widened to 0."""
    if not any(before or after for before, after in widths):
        return x
    pads = _ints(ctx, [w[0] for w in widths] + [w[1] for w in widths], f"{hint}/pads")
    if isinstance(x, QValue):
        from onnx import helper

        value = ctx.fresh(f"{hint}/value")
        ctx.initializers.append(helper.make_tensor(value, container(x.lo, x.hi)[0], [], [0]))
        out = ctx.op("Pad", [x.name, pads, value], hint, mode="constant")
        return QValue(out, x.scale, min(x.lo, 0), max(x.hi, 0))
    return FValue(ctx.op("Pad", [x.name, pads, ctx.scalar(fill, f"{hint}/value")], hint,
                         mode="constant"))


def _roll(ctx: Emitter, x: str, shape: tuple[int, ...], plan: list[tuple[int, int]],
          hint: str) -> str:
    """``torch.roll`` as two ``Slice`` and a ``Concat`` per rolled axis (exact)."""
    for i, (axis, shift) in enumerate(plan):
        size = shape[axis]
        tail = _slice(ctx, x, [axis], [size - shift], [size], f"{hint}/tail_{i}")
        head = _slice(ctx, x, [axis], [0], [size - shift], f"{hint}/head_{i}")
        x = ctx.op("Concat", [tail, head], f"{hint}/roll_{i}", axis=axis)
    return x


def _moved_input(ctx: Emitter, node: fx.Node, arg: Any) -> tuple[QValue | FValue, float | None]:
    """The tensor a data-movement prefix (pad, roll, slices, window partition) starts from: the
    integer codes *before* a ``Dequantize`` together with its scale, else the float tensor.

    Moving codes and dequantizing afterwards gives the same float values (a dequantize is
    elementwise), and it keeps ``DequantizeLinear -> Slice/Reshape`` chains out of the file:
    onnxruntime 1.32's QDQ propagation rewrites those into a ``QuantizeLinear`` it then rejects
    (``output_dtype INT8 does not match y_zero_point``) at session creation.
    """
    if isinstance(arg, fx.Node) and arg.op == "call_module" and \
            isinstance(ctx.module(arg), im.Dequantize):
        codes = ctx.value(arg.args[0])
        if isinstance(codes, (QValue, SumValue)):
            return ctx.as_qvalue(codes, f"{node.name}/codes"), float(ctx.module(arg).scale)
    value = ctx.value(arg)
    if isinstance(value, SumValue):
        value = ctx.as_qvalue(value, f"{node.name}/x_q")
    if not isinstance(value, (QValue, FValue)):
        raise BackendError(f"{node.format_node()}: expects a tensor input, got {value!r}")
    return value, None


def _as_float(ctx: Emitter, value: QValue | FValue, scale: float | None, hint: str) -> str:
    """The float tensor of a moved value (dequantized at ``scale`` when it holds codes)."""
    if isinstance(value, FValue):
        return value.name
    return ctx.dequantize(value, value.scale if scale is None else scale, hint)


def _finish_moved(ctx: Emitter, node: fx.Node, value: QValue | FValue,
                  dq_scale: float | None) -> QValue | FValue:
    """The result of a data-movement op named ``node.name``: dequantized when its input was a
    ``Dequantize`` whose codes were moved instead (see :func:`_moved_input`)."""
    if dq_scale is None:
        return _named(ctx, node, value)
    return FValue(_as_float(ctx, value, dq_scale, node.name))


def _named(ctx: Emitter, node: fx.Node, value: QValue | FValue) -> QValue | FValue:
    """``value`` under the tensor name ``node.name`` (what ``verify`` compares)."""
    return _rewrap(value, ctx.op("Identity", [value.name], node.name))  # type: ignore[return-value]


@register(F.pad)
def _pad_function(ctx: Emitter, node: fx.Node) -> Value:
    """``F.pad(x, pad, mode="constant", value=0)``; integer codes only with ``value`` 0; the
    batch dim is not padded."""
    x, dq_scale = _moved_input(ctx, node, node.args[0])
    shape = ctx.shape(node.args[0])
    value = ctx.value(call_arg(node, 3, "value", None))
    widths = pad_widths(node, len(shape), ctx.value(call_arg(node, 1, "pad", None)),
                        ctx.value(call_arg(node, 2, "mode", "constant")), value)
    if any(widths[a] != (0, 0) for a in batch_axes(ctx, node.args[0])):  # type: ignore[arg-type]
        raise BackendError(f"{node.format_node()}: padding the (dynamic) batch dimension is not "
                           "exported")
    if isinstance(x, QValue) and value not in (None, 0, 0.0):
        if dq_scale is None:
            raise BackendError(f"{node.format_node()}: padding integer codes with {value!r} is "
                               "not exported (only 0, which is code 0)")
        x, dq_scale = FValue(_as_float(ctx, x, dq_scale, f"{node.name}/x")), None
    padded = _pad(ctx, x, widths, float(value or 0.0), f"{node.name}/pad")
    return _finish_moved(ctx, node, padded, dq_scale)


@register(torch.roll, torch.Tensor.roll)
def _roll_function(ctx: Emitter, node: fx.Node) -> Value:
    """``torch.roll(x, shifts, dims)`` along static (non-batch) dims."""
    x, dq_scale = _moved_input(ctx, node, node.args[0])
    shape = ctx.shape(node.args[0])
    plan = roll_plan(node, shape, ctx.value(call_arg(node, 1, "shifts", None)),
                     ctx.value(call_arg(node, 2, "dims", None)))
    if {a for a, _ in plan} & batch_axes(ctx, node.args[0]):  # type: ignore[arg-type]
        raise BackendError(f"{node.format_node()}: rolling the (dynamic) batch dimension is not "
                           "exported")
    moved = _rewrap(x, _roll(ctx, x.name, shape, plan, f"{node.name}/roll"))
    return _finish_moved(ctx, node, moved, dq_scale)  # type: ignore[arg-type]


@register(torch.einsum)
def _einsum(ctx: Emitter, node: fx.Node) -> Value:
    """``torch.einsum(equation, *operands)`` of float tensors as ``Einsum``."""
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = einsum_equation(node, ctx.value(node.args[0]), len(operands))
    names = [ctx.real(node, arg) for arg in operands]
    return FValue(ctx.op("Einsum", names, node.name, equation=equation))


@register(*SWIN_PATCH_MERGING_PAD)
def _patch_merging_pad(ctx: Emitter, node: fx.Node) -> Value:
    """Zero-pad H, W to even, then the 2x2 phases (0,0), (1,0), (0,1), (1,1) along channels."""
    x, dq_scale = _moved_input(ctx, node, node.args[0])
    shape = ctx.shape(node.args[0])
    if len(shape) < 3:
        raise BackendError(f"{node.format_node()}: expects a (..., H, W, C) input")
    h_axis, w_axis = len(shape) - 3, len(shape) - 2
    if {h_axis, w_axis} & batch_axes(ctx, node.args[0]):  # type: ignore[arg-type]
        raise BackendError(f"{node.format_node()}: H or W is the (dynamic) batch dimension")
    widths = [(0, 0)] * len(shape)
    widths[h_axis], widths[w_axis] = (0, shape[h_axis] % 2), (0, shape[w_axis] % 2)
    x = _pad(ctx, x, widths, 0.0, f"{node.name}/pad")
    ends = [shape[h_axis] + widths[h_axis][1], shape[w_axis] + widths[w_axis][1]]
    phases = [_slice(ctx, x.name, [h_axis, w_axis], [dh, dw], ends, f"{node.name}/phase_{i}",
                     steps=[2, 2])
              for i, (dh, dw) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1)))]
    merged = _rewrap(x, ctx.op("Concat", phases, f"{node.name}/concat", axis=len(shape) - 1))
    return _finish_moved(ctx, node, merged, dq_scale)  # type: ignore[arg-type]


@register(*SWIN_RELATIVE_POSITION_BIAS)
def _relative_position_bias(ctx: Emitter, node: fx.Node) -> Value:
    """``table[index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)`` as a ``Gather``."""
    table = ctx.real(node, node.args[0])
    index, tokens = relative_position_index(ctx, node)
    table_shape = ctx.shape(node.args[0])
    if len(table_shape) != 2 or index.min() < 0 or index.max() >= table_shape[0]:
        raise BackendError(f"{node.format_node()}: expects a (rows, heads) table and indices "
                           f"in [0, rows), got {table_shape}")
    heads = table_shape[1]
    gathered = ctx.op("Gather", [table, ctx.const(index, f"{node.name}/index")],
                      f"{node.name}/gather", axis=0)
    grid = ctx.op("Reshape", [gathered, _ints(ctx, [tokens, tokens, heads], f"{node.name}/nnh")],
                  f"{node.name}/grid")
    per_head = ctx.op("Transpose", [grid], f"{node.name}/heads", perm=[2, 0, 1])
    return FValue(ctx.op("Reshape", [per_head, _ints(ctx, [1, heads, tokens, tokens],
                                                      f"{node.name}/shape")], node.name))


def _reshape(ctx: Emitter, x: str, dims: list[int], hint: str) -> str:
    return ctx.op("Reshape", [x, _ints(ctx, dims, f"{hint}/dims")], hint)


def _normalize(ctx: Emitter, x: str, hint: str) -> str:
    """``F.normalize(x, dim=-1)``: ``x / max(||x||_2, 1e-12)``."""
    squares = ctx.op("Mul", [x, x], f"{hint}/sq")
    total = ctx.op("ReduceSum", [squares, _ints(ctx, [-1], f"{hint}/axis")], f"{hint}/sum",
                   keepdims=1)
    norm = ctx.op("Sqrt", [total], f"{hint}/norm")
    norm = ctx.op("Max", [norm, ctx.scalar(1e-12, f"{hint}/eps")], f"{hint}/floor")
    return ctx.op("Div", [x, norm], hint)


def _scores(ctx: Emitter, q: str, k: str, plan: WindowAttentionPlan, hint: str) -> str:
    if plan.logit_scale is None:
        q = ctx.op("Mul", [q, ctx.scalar(plan.q_scale, f"{hint}/q_scale")], f"{hint}/q")
        k_t = ctx.op("Transpose", [k], f"{hint}/k_t", perm=[0, 1, 3, 2])
        return ctx.op("MatMul", [q, k_t], hint)
    k_t = ctx.op("Transpose", [_normalize(ctx, k, f"{hint}/k_n")], f"{hint}/k_t",
                 perm=[0, 1, 3, 2])
    scores = ctx.op("MatMul", [_normalize(ctx, q, f"{hint}/q_n"), k_t], f"{hint}/cos")
    scale = ctx.const(plan.logit_scale.reshape(plan.heads, 1, 1), f"{hint}/logit_scale")
    return ctx.op("Mul", [scores, scale], hint)


def _attend(ctx: Emitter, x: str, bias: str, plan: WindowAttentionPlan, hint: str) -> str:
    """Multi-head attention in each window: ``(B*nW, N, C) -> (B*nW, N, C)``."""
    c, n, heads = plan.shape[3], plan.tokens, plan.heads
    qkv = _linear(ctx, f"{hint}/qkv", x, torch.from_numpy(plan.qkv_weight),
                  None if plan.qkv_bias is None else torch.from_numpy(plan.qkv_bias))
    qkv = _reshape(ctx, qkv, [-1, n, 3, heads, c // heads], f"{hint}/qkv_split")
    qkv = ctx.op("Transpose", [qkv], f"{hint}/qkv_t", perm=[2, 0, 3, 1, 4])
    q, k, v = (ctx.op("Gather", [qkv, ctx.const(np.array(i, np.int64), f"{hint}/pick_{i}")],
                      f"{hint}/{name}", axis=0) for i, name in enumerate("qkv"))
    scores = ctx.op("Add", [_scores(ctx, q, k, plan, f"{hint}/scores"), bias], f"{hint}/biased")
    if plan.mask is not None:
        windows = plan.mask.shape[0]
        scores = _reshape(ctx, scores, [-1, windows, heads, n, n], f"{hint}/per_image")
        mask = ctx.const(plan.mask[None, :, None], f"{hint}/mask")
        scores = _reshape(ctx, ctx.op("Add", [scores, mask], f"{hint}/masked"),
                          [-1, heads, n, n], f"{hint}/per_window")
    probs = ctx.op("Softmax", [scores], f"{hint}/probs", axis=-1)
    out = ctx.op("Transpose", [ctx.op("MatMul", [probs, v], f"{hint}/mix")], f"{hint}/mix_t",
                 perm=[0, 2, 1, 3])
    out = _reshape(ctx, out, [-1, n, c], f"{hint}/merged")
    return _linear(ctx, f"{hint}/proj", out, torch.from_numpy(plan.proj_weight),
                   None if plan.proj_bias is None else torch.from_numpy(plan.proj_bias))


@register(*SWIN_ATTENTION)
def _shifted_window_attention(ctx: Emitter, node: fx.Node) -> Value:
    """torchvision's ``shifted_window_attention`` (plan: ``window_attention_plan``)."""
    moved, dq_scale = _moved_input(ctx, node, node.args[0])
    plan = window_attention_plan(ctx, node, ctx.shape(node.args[0]))
    bias_arg = call_arg(node, 3, "relative_position_bias", None)
    bias = ctx.real(node, bias_arg)
    n, heads = plan.tokens, plan.heads
    if ctx.shape(bias_arg) not in ((1, heads, n, n), (heads, n, n)):
        raise BackendError(f"{node.format_node()}: relative_position_bias of shape "
                           f"{ctx.shape(bias_arg)}, expected (1, {heads}, {n}, {n})")
    _, h, w, c = plan.shape
    (ph, pw), (gh, gw), (wh, ww) = plan.padded, plan.grid, plan.window
    hint = node.name
    x = _pad(ctx, moved, [(0, 0), (0, ph - h), (0, pw - w), (0, 0)], 0.0, f"{hint}/pad").name
    padded_shape = (1, ph, pw, c)
    s_h, s_w = plan.shift
    x = _roll(ctx, x, padded_shape, [(a, s % p) for a, s, p in ((1, -s_h, ph), (2, -s_w, pw))
                                     if s % p], f"{hint}/shift")
    x = _reshape(ctx, x, [-1, gh, wh, gw, ww, c], f"{hint}/grid")
    x = _reshape(ctx, ctx.op("Transpose", [x], f"{hint}/grid_t", perm=[0, 1, 3, 2, 4, 5]),
                 [-1, n, c], f"{hint}/windows")
    if isinstance(moved, QValue):
        x = _as_float(ctx, QValue(x, moved.scale, min(moved.lo, 0), max(moved.hi, 0)), dq_scale,
                      f"{hint}/windows_f")
    x = _attend(ctx, x, bias, plan, f"{hint}/attention")
    x = _reshape(ctx, x, [-1, gh, gw, wh, ww, c], f"{hint}/unwindows")
    x = _reshape(ctx, ctx.op("Transpose", [x], f"{hint}/ungrid_t", perm=[0, 1, 3, 2, 4, 5]),
                 [-1, ph, pw, c], f"{hint}/ungrid")
    x = _roll(ctx, x, padded_shape, [(a, s % p) for a, s, p in ((1, s_h, ph), (2, s_w, pw))
                                     if s % p], f"{hint}/unshift")
    if (ph, pw) != (h, w):
        x = _slice(ctx, x, [1, 2], [0, 0], [h, w], f"{hint}/crop")
    return _named(ctx, node, FValue(x))

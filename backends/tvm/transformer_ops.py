"""Transformer ops as float islands in Relax: layer norm, softmax, matmul of two activations,
scaled dot-product attention and ``nn.MultiheadAttention`` (a float ``nn.Linear`` on tokens is
lowered by ``float_ops.py``).

``convert(integer=True)`` leaves these ops in float between a ``Dequantize`` and the next
``Quantize`` (no integer form of them is defined in ``djpq_compiler/ir`` yet), so they take and
return :class:`~.emit.FloatValue` in float32, computed the way PyTorch defines them:

* ``layer_norm``: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing
  ``normalized_shape`` dims (biased variance), as Relax ``nn.layer_norm``; the channels-first
  ``LayerNorm2d`` of ConvNeXt is its permutes around a channels-last layer norm.
* ``softmax`` along one dim; ``matmul``/``bmm``/``@`` of two float tensors.
* ``scaled_dot_product_attention``: ``softmax(q @ k^T * scale + mask) @ v`` with
  ``scale = 1/sqrt(E)`` by default, a float additive ``attn_mask`` and ``is_causal``; dropout
  must be 0 (inference).
* ``nn.MultiheadAttention`` (packed or separate q/k/v projections, ``batch_first`` either way,
  no ``bias_k``/``add_zero_attn``/masks): in-projections, heads, the attention above, the output
  projection; the averaged attention weights when ``need_weights``.

The float math is TVM's (its own ``exp``, its own reduction order), so a float island may differ
from PyTorch by a few float32 ulps; where that lands on a rounding tie of the next ``Quantize``
the codes differ by one LSB. Integer codes elsewhere stay bit-exact.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import BackendError

from ..common_ops import check_multihead_attention, layer_norm_params, mha_projections
from ..lowering import call_arg
from .emit import FloatValue, IntValue, Lowered, Lowering, register

__all__ = ["attention"]


def _float(ctx: Lowering, node: fx.Node, arg: Any) -> Any:
    """The Relax expression of a float tensor argument."""
    value = ctx.value(arg)
    if isinstance(value, FloatValue):
        return value.expr
    what = "integer codes (a Dequantize must precede float ops)" if isinstance(
        value, IntValue) else repr(value)
    raise BackendError(f"{node.format_node()}: expects a float tensor, got {what}")


def _const(ctx: Lowering, tensor: torch.Tensor | None, fill: float, size: tuple[int, ...]) -> Any:
    data = (tensor.detach().cpu().float().numpy() if tensor is not None
            else np.full(size, fill, np.float32))
    return ctx.bb.const(data, "float32")


@register(*facts.LAYER_NORM)
def convert_layer_norm(ctx: Lowering, node: fx.Node) -> Lowered:
    """``nn.LayerNorm`` / ``F.layer_norm(x, normalized_shape, weight, bias, eps)`` over the
    trailing ``normalized_shape`` dims (affine or not); parameters from ``layer_norm_params``."""
    x = _float(ctx, node, node.args[0])
    in_shape = tuple(ctx.bb.shape(x))
    p = layer_norm_params(ctx, node, in_shape)
    if p.weight is not None and p.weight.dtype != torch.float32:
        raise BackendError(f"{node.format_node()}: float32 LayerNorm only")
    axes = list(range(len(in_shape) - len(p.shape), len(in_shape)))
    gamma, beta = _const(ctx, p.weight, 1.0, p.shape), _const(ctx, p.bias, 0.0, p.shape)
    return FloatValue(ctx.bb.call("nn.layer_norm", x, gamma, beta, axes, p.eps))


def _softmax(ctx: Lowering, node: fx.Node, x: Any, dim: Any) -> Lowered:
    if not isinstance(dim, int):
        raise BackendError(f"{node.format_node()}: softmax needs a static int dim, got {dim!r}")
    return FloatValue(ctx.bb.call("nn.softmax", x, dim % len(ctx.bb.shape(x))))


@register(F.softmax, torch.softmax, torch.Tensor.softmax)
def convert_softmax(ctx: Lowering, node: fx.Node) -> Lowered:
    """``softmax(x, dim)`` (``dtype`` must be unset or float32)."""
    dtype = node.kwargs.get("dtype", node.args[3] if len(node.args) > 3 else None)
    if dtype not in (None, torch.float32):
        raise BackendError(f"{node.format_node()}: softmax with dtype={dtype} is not lowered")
    dim = ctx.value(call_arg(node, 1, "dim", None))
    return _softmax(ctx, node, _float(ctx, node, node.args[0]), dim)


@register(nn.Softmax)
def convert_softmax_module(ctx: Lowering, node: fx.Node) -> Lowered:
    """``nn.Softmax(dim)``."""
    return _softmax(ctx, node, _float(ctx, node, node.args[0]), ctx.module(node).dim)


def _matmul(ctx: Lowering, a: Any, b: Any) -> Any:
    return ctx.bb.matmul(a, b, "float32")


@register(*facts.MATMUL)
def convert_matmul(ctx: Lowering, node: fx.Node) -> Lowered:
    """``a @ b`` of two float activations (batched, broadcasting like ``torch.matmul``)."""
    a, b = _float(ctx, node, node.args[0]), _float(ctx, node, node.args[1])
    return FloatValue(_matmul(ctx, a, b))


def _swap_last(ctx: Lowering, x: Any) -> Any:
    ndim = len(ctx.bb.shape(x))
    return ctx.bb.permute(x, list(range(ndim - 2)) + [ndim - 1, ndim - 2])


def attention(ctx: Lowering, q: Any, k: Any, v: Any, mask: Any | None, causal: bool,
              scale: float | None) -> tuple[Any, Any]:
    """``(softmax(q @ k^T * scale + mask) @ v, probabilities)`` in float32."""
    q_shape, k_shape = ctx.bb.shape(q), ctx.bb.shape(k)
    factor = 1.0 / math.sqrt(q_shape[-1]) if scale is None else float(scale)
    scores = _matmul(ctx, q, _swap_last(ctx, k))
    scores = ctx.bb.binary("multiply", scores, ctx.bb.const(np.float32(factor), "float32"))
    if causal:
        length, source = q_shape[-2], k_shape[-2]
        keep = np.tril(np.ones((length, source), dtype=bool))
        mask_np = np.where(keep, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
        scores = ctx.bb.binary("add", scores, ctx.bb.const(mask_np, "float32"))
    if mask is not None:
        scores = ctx.bb.binary("add", scores, mask)
    probs = ctx.bb.call("nn.softmax", scores, len(ctx.bb.shape(scores)) - 1)
    return _matmul(ctx, probs, v), probs


@register(F.scaled_dot_product_attention)
def convert_sdpa(ctx: Lowering, node: fx.Node) -> Lowered:
    """``F.scaled_dot_product_attention`` decomposed (float additive mask or none)."""
    q, k, v = (_float(ctx, node, node.args[i]) for i in range(3))
    mask_arg = call_arg(node, 3, "attn_mask", None)
    dropout = ctx.value(call_arg(node, 4, "dropout_p", 0.0))
    causal = ctx.value(call_arg(node, 5, "is_causal", False))
    scale = ctx.value(call_arg(node, 6, "scale", None))
    if node.kwargs.get("enable_gqa", False):
        raise BackendError(f"{node.format_node()}: enable_gqa is not lowered")
    if not isinstance(dropout, (int, float)) or dropout != 0 or not isinstance(causal, bool):
        raise BackendError(f"{node.format_node()}: attention needs dropout_p=0 and a static "
                           f"is_causal (got {dropout!r}, {causal!r}); trace in eval mode")
    mask = None if mask_arg is None else _float(ctx, node, mask_arg)
    out, _ = attention(ctx, q, k, v, mask, causal, scale)
    return FloatValue(out)


def _linear(ctx: Lowering, x: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    w = np.ascontiguousarray(weight.detach().cpu().float().numpy().T)
    out = _matmul(ctx, x, ctx.bb.const(w, "float32"))
    if bias is not None:
        out = ctx.bb.binary("add", out, _const(ctx, bias, 0.0, ()))
    return out


def _heads(ctx: Lowering, x: Any, heads: int) -> Any:
    """``(N, L, E) -> (N, H, L, E/H)``."""
    n, length, embed = ctx.bb.shape(x)
    return ctx.bb.permute(ctx.bb.reshape(x, (n, length, heads, embed // heads)), [0, 2, 1, 3])




@register(nn.MultiheadAttention)
def convert_multihead_attention(ctx: Lowering, node: fx.Node) -> Lowered:
    """``nn.MultiheadAttention(q, k, v)`` -> ``(output, weights or None)``."""
    m = ctx.module(node)
    check_multihead_attention(node, m)
    inputs = [_float(ctx, node, node.args[i] if len(node.args) > i else node.kwargs[name])
              for i, name in enumerate(("query", "key", "value"))]
    if not m.batch_first:
        inputs = [ctx.bb.permute(x, [1, 0, 2]) for x in inputs]
    q, k, v = (_heads(ctx, _linear(ctx, x, w, b), m.num_heads)
               for x, (w, b) in zip(inputs, mha_projections(m), strict=True))
    out, probs = attention(ctx, q, k, v, None, False, None)
    n, _, length, _ = ctx.bb.shape(out)
    out = ctx.bb.reshape(ctx.bb.permute(out, [0, 2, 1, 3]), (n, length, m.embed_dim))
    out = _linear(ctx, out, m.out_proj.weight, m.out_proj.bias)
    if not m.batch_first:
        out = ctx.bb.permute(out, [1, 0, 2])
    need = node.kwargs.get("need_weights", True)
    if not need:
        return (FloatValue(out), None)
    if node.kwargs.get("average_attn_weights", True):
        probs = ctx.bb.call("mean", probs, [1])
    return (FloatValue(out), FloatValue(probs))

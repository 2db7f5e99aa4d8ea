"""Transformer ops for the ONNX exporter, as float islands (DQ -> op -> Q).

``LayerNormalization`` (``nn.LayerNorm``, ``F.layer_norm``), ``Softmax``, ``MatMul`` of two float
activations, ``F.scaled_dot_product_attention`` decomposed (``MatMul``, scale, causal/additive
mask, ``Softmax``, ``MatMul``) and ``nn.MultiheadAttention`` decomposed (in-projections,
heads, attention, output projection). The batch dimension stays dynamic (``Reshape`` copies it
with a 0). Same float definitions as ``backends/tvm/transformer_ops.py``; onnxruntime's float
math may differ from PyTorch by a few ulps, so codes after these islands agree to <= 1 LSB.
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
from .graph import Emitter, FValue, Value, register

__all__: list[str] = []


def _weights(ctx: Emitter, node: fx.Node, weight: torch.Tensor | None,
             bias: torch.Tensor | None, shape: tuple[int, ...]) -> list[str]:
    w = (weight.detach().cpu().float().numpy() if weight is not None
         else np.ones(shape, np.float32))
    names = [ctx.const(w, f"{node.name}/gamma")]
    if bias is not None:
        names.append(ctx.const(bias.detach().cpu().float().numpy(), f"{node.name}/beta"))
    return names


@register(*facts.LAYER_NORM)
def _layer_norm(ctx: Emitter, node: fx.Node) -> Value:
    """``nn.LayerNorm`` / ``F.layer_norm`` as ``LayerNormalization`` (parameters from
    ``layer_norm_params``)."""
    x = ctx.real(node, node.args[0])
    p = layer_norm_params(ctx, node, ctx.shape(node.args[0]))
    return FValue(ctx.op("LayerNormalization", [x, *_weights(ctx, node, p.weight, p.bias, p.shape)],
                         node.name, axis=-len(p.shape), epsilon=p.eps))


def _softmax(ctx: Emitter, node: fx.Node, dim: Any) -> Value:
    if not isinstance(dim, int):
        raise BackendError(f"{node.format_node()}: softmax needs a static int dim")
    ndim = len(ctx.shape(node.args[0]))
    return FValue(ctx.op("Softmax", [ctx.real(node, node.args[0])], node.name, axis=dim % ndim))


@register(F.softmax, torch.softmax, torch.Tensor.softmax)
def _softmax_function(ctx: Emitter, node: fx.Node) -> Value:
    dtype = node.kwargs.get("dtype", node.args[3] if len(node.args) > 3 else None)
    if dtype not in (None, torch.float32):
        raise BackendError(f"{node.format_node()}: softmax with dtype={dtype} is not exported")
    return _softmax(ctx, node, ctx.value(call_arg(node, 1, "dim", None)))


@register(nn.Softmax)
def _softmax_module(ctx: Emitter, node: fx.Node) -> Value:
    return _softmax(ctx, node, ctx.module(node).dim)


@register(*facts.MATMUL)
def _matmul(ctx: Emitter, node: fx.Node) -> Value:
    a, b = ctx.real(node, node.args[0]), ctx.real(node, node.args[1])
    return FValue(ctx.op("MatMul", [a, b], node.name))


def _attention(ctx: Emitter, hint: str, q: str, k: str, v: str, rank: int,
               lengths: tuple[int, int], head_dim: int, mask: str | None, causal: bool,
               scale: float | None) -> tuple[str, str]:
    """``(softmax(q @ k^T * scale + mask) @ v, probabilities)``; ``lengths = (L, S)``."""
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    k_t = ctx.op("Transpose", [k], f"{hint}/k_t", perm=perm)
    scores = ctx.op("MatMul", [q, k_t], f"{hint}/scores")
    factor = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    scores = ctx.op("Mul", [scores, ctx.scalar(factor, f"{hint}/scale")], f"{hint}/scaled")
    if causal:
        keep = np.tril(np.ones(lengths, dtype=bool))
        causal_mask = np.where(keep, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
        scores = ctx.op("Add", [scores, ctx.const(causal_mask, f"{hint}/causal")],
                        f"{hint}/causal_scores")
    if mask is not None:
        scores = ctx.op("Add", [scores, mask], f"{hint}/masked")
    probs = ctx.op("Softmax", [scores], f"{hint}/probs", axis=rank - 1)
    return ctx.op("MatMul", [probs, v], hint), probs


@register(F.scaled_dot_product_attention)
def _sdpa(ctx: Emitter, node: fx.Node) -> Value:
    q, k, v = (ctx.real(node, node.args[i]) for i in range(3))
    mask_arg = call_arg(node, 3, "attn_mask", None)
    dropout = ctx.value(call_arg(node, 4, "dropout_p", 0.0))
    causal = ctx.value(call_arg(node, 5, "is_causal", False))
    scale = ctx.value(call_arg(node, 6, "scale", None))
    if node.kwargs.get("enable_gqa", False) or dropout != 0 or not isinstance(causal, bool):
        raise BackendError(f"{node.format_node()}: attention is exported with dropout_p=0, a "
                           "static is_causal and without enable_gqa only")
    mask = None if mask_arg is None else ctx.real(node, mask_arg)
    q_shape, k_shape = ctx.shape(node.args[0]), ctx.shape(node.args[1])
    out, _ = _attention(ctx, node.name, q, k, v, len(q_shape), (q_shape[-2], k_shape[-2]),
                        q_shape[-1], mask, causal, scale)
    return FValue(out)


def _linear(ctx: Emitter, hint: str, x: str, weight: torch.Tensor,
            bias: torch.Tensor | None) -> str:
    w = np.ascontiguousarray(weight.detach().cpu().float().numpy().T)
    out = ctx.op("MatMul", [x, ctx.const(w, f"{hint}/wt")], f"{hint}/matmul")
    if bias is None:
        return out
    b = ctx.const(bias.detach().cpu().float().numpy(), f"{hint}/b")
    return ctx.op("Add", [out, b], hint)



@register(nn.MultiheadAttention)
def _multihead_attention(ctx: Emitter, node: fx.Node) -> Value:
    """``nn.MultiheadAttention(q, k, v)`` -> ``(output, weights or None)``, no masks."""
    m = ctx.module(node)
    check_multihead_attention(node, m)
    args = [node.args[i] if len(node.args) > i else node.kwargs[n]
            for i, n in enumerate(("query", "key", "value"))]
    heads, embed = m.num_heads, m.embed_dim
    names, lengths = [], []
    for i, (arg, (w, b)) in enumerate(zip(args, mha_projections(m), strict=True)):
        x = ctx.real(node, arg)
        shape = ctx.shape(arg)
        if not m.batch_first:
            x = ctx.op("Transpose", [x], f"{node.name}/in_{i}_bf", perm=[1, 0, 2])
        length = shape[1] if m.batch_first else shape[0]
        proj = _linear(ctx, f"{node.name}/proj_{i}", x, w, b)
        dims = ctx.const(np.array([0, length, heads, embed // heads], np.int64),
                         f"{node.name}/heads_{i}")
        split = ctx.op("Reshape", [proj, dims], f"{node.name}/split_{i}")
        names.append(ctx.op("Transpose", [split], f"{node.name}/heads_{i}_t", perm=[0, 2, 1, 3]))
        lengths.append(length)
    q, k, v = names
    out, probs = _attention(ctx, f"{node.name}/attention", q, k, v, 4, (lengths[0], lengths[1]),
                            embed // heads, None, False, None)
    merged = ctx.op("Transpose", [out], f"{node.name}/merge_t", perm=[0, 2, 1, 3])
    dims = ctx.const(np.array([0, lengths[0], embed], np.int64), f"{node.name}/merge_dims")
    out = ctx.op("Reshape", [merged, dims], f"{node.name}/merged")
    out = _linear(ctx, f"{node.name}/out_proj", out, m.out_proj.weight, m.out_proj.bias)
    if not m.batch_first:
        out = ctx.op("Transpose", [out], f"{node.name}/out_bf", perm=[1, 0, 2])
    if not node.kwargs.get("need_weights", True):
        return (FValue(out), None)
    if node.kwargs.get("average_attn_weights", True):
        axes = ctx.const(np.array([1], np.int64), f"{node.name}/head_axis")
        probs = ctx.op("ReduceMean", [probs, axes], f"{node.name}/weights", keepdims=0)
    return (FValue(out), FValue(probs))

"""Backend-neutral analysis of ops every backend lowers: *what* to compute, as plain data.

Each backend only emits the result in its own IR:

* :func:`check_inference_identity` -- dropout (every form) and torchvision's stochastic depth
  are the identity at inference; in training mode (with ``p > 0``) they are refused.
* :func:`plan_slice` -- ``x[index]`` (ints, positive-step slices, one ``...``) as the slices
  to take and the axes to pick (and drop).
* :func:`layer_norm_params` -- ``nn.LayerNorm`` / ``F.layer_norm``: normalized shape, weight,
  bias, eps, checked against the input shape.
* :func:`check_multihead_attention`, :func:`mha_projections` -- what of
  ``nn.MultiheadAttention`` is lowered, and its q/k/v in-projections.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from djpq_compiler import op_facts
from djpq_compiler.errors import BackendError

from .lowering import LoweringContext, call_arg

__all__ = [
    "DROPOUT_TRAINING_ARG",
    "INFERENCE_IDENTITIES",
    "LayerNormParams",
    "SlicePlan",
    "check_inference_identity",
    "check_multihead_attention",
    "layer_norm_params",
    "mha_projections",
    "plan_slice",
    "stochastic_depth_targets",
]

#: Functional dropouts: position, name and default of their ``training`` argument.
DROPOUT_TRAINING_ARG: dict[Any, tuple[int, str, bool]] = {
    F.dropout: (2, "training", True),
    F.dropout1d: (2, "training", True),
    F.dropout2d: (2, "training", True),
    F.dropout3d: (2, "training", True),
    F.alpha_dropout: (2, "training", False),
    F.feature_alpha_dropout: (2, "training", False),
    torch.dropout: (2, "train", True),
}


def stochastic_depth_targets() -> tuple[object, ...]:
    """torchvision's ``StochasticDepth`` module and ``stochastic_depth`` function (empty when
    torchvision is not installed)."""
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:  # torchvision is optional
        return ()
    return (StochasticDepth, stochastic_depth)


#: Every op that is the identity at inference (a backend registers one converter for all).
INFERENCE_IDENTITIES = op_facts.DROPOUTS + stochastic_depth_targets()


def _constant(node: fx.Node, what: str, value: Any, kinds: tuple[type, ...]) -> Any:
    if not isinstance(value, kinds):
        raise BackendError(
            f"{node.format_node()}: {what} must be a constant at trace time, got {value!r}; "
            "trace the model in eval mode"
        )
    return value


def check_inference_identity(ctx: LoweringContext, node: fx.Node) -> None:
    """Check that a dropout / stochastic-depth node is the identity (eval mode, or ``p == 0``).

    Raises:
        BackendError: The module is in training mode, or the call was traced with
            ``training=True``, with ``p > 0`` (it zeroes random values).
    """
    if node.op == "call_module":
        module = ctx.module(node)
        if module.training and float(module.p) > 0.0:
            raise BackendError(
                f"{node.format_node()}: {type(module).__name__}(p={module.p}) is in training "
                "mode, where it zeroes random values; call converted.eval() before lowering it"
            )
        return
    if node.target in DROPOUT_TRAINING_ARG:
        index, name, default = DROPOUT_TRAINING_ARG[node.target]
        p_default: Any = 0.5
    else:  # stochastic_depth(input, p, mode, training=True)
        index, name, default, p_default = 3, "training", True, None
    training = _constant(node, f"{name!r}", call_arg(node, index, name, default), (bool,))
    p = _constant(node, "'p'", call_arg(node, 1, "p", p_default), (int, float))
    if training and p > 0:
        raise BackendError(
            f"{node.format_node()}: dropout was traced with {name}=True and p={p}, so it zeroes "
            "random values; pass training=self.training and trace/convert the model in eval mode"
        )


# ------------------------------------------------------------------------------ slicing


@dataclass(frozen=True)
class SlicePlan:
    """``x[index]`` as data.

    Attributes:
        slices: ``(axis, start, stop, step)`` of every axis sliced (``:`` on an axis omitted).
        picks: ``(axis, position)`` of every axis indexed by an int; these axes are dropped.
    """

    slices: tuple[tuple[int, int, int, int], ...]
    picks: tuple[tuple[int, int], ...]


def plan_slice(node: fx.Node, shape: Sequence[int], index: Any,
               fixed_axes: Collection[int] = (), fixed_why: str = "") -> SlicePlan:
    """What ``x[index]`` computes, for ints, positive-step slices and one ``...``.

    Args:
        node: The ``getitem`` node (for messages).
        shape: The static shape of ``x``.
        index: The lowered index (an int, a slice, ``...`` or a tuple of them).
        fixed_axes: Axes that may only be taken whole (``:``), e.g. a dynamic batch dim.
        fixed_why: Why, for the message.

    Raises:
        BackendError: ``None``, tensors, bools, negative steps, several ``...``, too many
            indices, or a fixed axis indexed.
    """
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1:
        raise BackendError(f"{node.format_node()}: more than one ... in an index")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    if len(items) > len(shape):
        raise BackendError(f"{node.format_node()}: {len(items)} indices for {len(shape)} dims")
    slices: list[tuple[int, int, int, int]] = []
    picks: list[tuple[int, int]] = []
    for axis, item in enumerate(items):
        if isinstance(item, slice) and item == slice(None):
            continue
        if axis in fixed_axes:
            raise BackendError(f"{node.format_node()}: indexing dim {axis}, {fixed_why}")
        if isinstance(item, int) and not isinstance(item, bool):
            picks.append((axis, item % shape[axis]))
        elif isinstance(item, slice) and (item.step or 1) > 0:
            slices.append((axis, *item.indices(shape[axis])))
        else:
            raise BackendError(f"{node.format_node()}: only int, positive-step slice and ... "
                               f"indexing is supported, got {item!r}")
    return SlicePlan(tuple(slices), tuple(picks))


# ------------------------------------------------------------------------------ layer norm


@dataclass(frozen=True)
class LayerNormParams:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing ``shape`` dims."""

    shape: tuple[int, ...]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _parameter(ctx: LoweringContext, node: fx.Node, arg: Any) -> torch.Tensor | None:
    """A ``get_attr`` weight of a functional layer norm as a tensor (``None`` stays ``None``)."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value: Any = operator.attrgetter(str(arg.target))(ctx.gm)
        if torch.is_tensor(value):
            return value
    raise BackendError(f"{node.format_node()}: layer_norm weight/bias must be parameters "
                       f"(get_attr), got {arg!r}")


def layer_norm_params(ctx: LoweringContext, node: fx.Node,
                      in_shape: Sequence[int]) -> LayerNormParams:
    """The parameters of an ``nn.LayerNorm`` or ``F.layer_norm`` node, checked against the
    static shape of its input.

    Raises:
        BackendError: Weight/bias that are not parameters, or a ``normalized_shape`` that does
            not end the input shape.
    """
    if node.op == "call_module":
        m = ctx.module(node)
        params = LayerNormParams(tuple(m.normalized_shape), m.weight, getattr(m, "bias", None),
                                 float(m.eps))
    else:
        shape = ctx.value(call_arg(node, 1, "normalized_shape", None))
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        params = LayerNormParams(
            shape, _parameter(ctx, node, call_arg(node, 2, "weight", None)),
            _parameter(ctx, node, call_arg(node, 3, "bias", None)),
            float(call_arg(node, 4, "eps", 1e-5)))
    if tuple(in_shape[len(in_shape) - len(params.shape):]) != params.shape:
        raise BackendError(f"{node.format_node()}: normalized_shape {params.shape} does not end "
                           f"the input shape {tuple(in_shape)}")
    return params


# ------------------------------------------------------------------------------ attention


def check_multihead_attention(node: fx.Node, m: nn.MultiheadAttention) -> None:
    """Refuse what the backends do not lower: masks, ``bias_k``/``bias_v``, ``add_zero_attn``,
    ``is_causal`` and attention dropout in training mode.

    Raises:
        BackendError: Naming the node and the unsupported feature.
    """
    for name in ("key_padding_mask", "attn_mask"):
        if node.kwargs.get(name) is not None:
            raise BackendError(f"{node.format_node()}: MultiheadAttention with {name} is not "
                               "lowered")
    if len(node.args) > 3 or m.bias_k is not None or m.add_zero_attn or (
            m.training and m.dropout > 0) or node.kwargs.get("is_causal", False):
        raise BackendError(f"{node.format_node()}: MultiheadAttention is lowered without masks, "
                           "bias_k/bias_v, add_zero_attn and dropout (eval mode) only")


def mha_projections(m: nn.MultiheadAttention) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``[(weight, bias)]`` of the query, key and value in-projections (packed or separate)."""
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight
        weights = [w[:e], w[e:2 * e], w[2 * e:]]
    else:
        weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    bias = m.in_proj_bias
    biases = [None] * 3 if bias is None else [bias[:e], bias[e:2 * e], bias[2 * e:]]
    return list(zip(weights, biases, strict=True))

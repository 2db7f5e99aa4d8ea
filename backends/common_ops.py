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
* :func:`pad_widths`, :func:`roll_plan`, :func:`einsum_equation` -- ``F.pad`` (constant),
  ``torch.roll`` and ``torch.einsum`` arguments checked and normalized.
* :func:`window_attention_plan`, :func:`relative_position_index` -- torchvision Swin's
  ``shifted_window_attention`` (V1 and V2) and ``_get_relative_position_bias`` as data
  (sizes, shift after torchvision's adjustment, weights, the constant shift mask).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from djpq_compiler import op_facts
from djpq_compiler.errors import BackendError

from .lowering import LoweringContext, call_arg

__all__ = [
    "DROPOUT_TRAINING_ARG",
    "SWIN_ATTENTION",
    "SWIN_PATCH_MERGING_PAD",
    "SWIN_RELATIVE_POSITION_BIAS",
    "WindowAttentionPlan",
    "binary_alpha",
    "clamp_bounds",
    "constant_tensor",
    "cumsum_dim",
    "flip_dims",
    "index_select_plan",
    "rsub_operand",
    "relative_position_index",
    "window_attention_plan",
    "INFERENCE_IDENTITIES",
    "LayerNormParams",
    "SlicePlan",
    "check_inference_identity",
    "check_multihead_attention",
    "layer_norm_params",
    "einsum_equation",
    "mha_projections",
    "pad_widths",
    "roll_plan",
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


# ------------------------------------------------------------------------------ Swin windows
# torchvision's Swin calls three torch.fx.wrap-ed functions that stay leaf calls in a traced
# graph. The backends lower them as float islands; what each computes is planned here once.


def _swin_function(name: str) -> tuple[object, ...]:
    try:
        from torchvision.models import swin_transformer
    except ImportError:  # torchvision is optional
        return ()
    fn = getattr(swin_transformer, name, None)
    return () if fn is None else (fn,)


#: torchvision's ``shifted_window_attention`` (Swin V1 and V2), ``_patch_merging_pad`` and
#: ``_get_relative_position_bias`` (empty tuples when torchvision is not installed).
SWIN_ATTENTION = _swin_function("shifted_window_attention")
SWIN_PATCH_MERGING_PAD = _swin_function("_patch_merging_pad")
SWIN_RELATIVE_POSITION_BIAS = _swin_function("_get_relative_position_bias")


def constant_tensor(ctx: LoweringContext, node: fx.Node, arg: Any, what: str) -> torch.Tensor:
    """The tensor of a ``get_attr`` argument (weights, index buffers) read from the graph module.

    Raises:
        BackendError: ``arg`` is not a ``get_attr`` of a tensor.
    """
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value: Any = operator.attrgetter(str(arg.target))(ctx.gm)
        if torch.is_tensor(value):
            return value.detach().cpu()
    raise BackendError(f"{node.format_node()}: {what} must be a tensor attribute of the model "
                       f"(get_attr), got {arg!r}")


def index_select_plan(ctx: LoweringContext, node: fx.Node,
                      shape: Sequence[int]) -> tuple[int, np.ndarray]:
    """``torch.index_select(x, dim, index)`` with a constant index (``prune`` writes the kept
    positions of a channel selection as one, a ``get_attr`` buffer): the dim (non-negative) and
    the positions (1-D int64, each in ``[0, shape[dim])``).

    Raises:
        BackendError: A non-constant dim or index, or positions out of range.
    """
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
        raise BackendError(f"{node.format_node()}: index_select needs a constant dim in "
                           f"[-{len(shape)}, {len(shape)}), got {dim!r}")
    dim %= len(shape)
    index = node.args[2] if len(node.args) > 2 else node.kwargs.get("index")
    positions = constant_tensor(ctx, node, index, "index_select's index").reshape(-1)
    at = positions.to(torch.int64).numpy()
    if positions.is_floating_point() or (at.size and not 0 <= at.min() <= at.max() < shape[dim]):
        raise BackendError(f"{node.format_node()}: index_select positions must be integers in "
                           f"[0, {shape[dim]}) along dim {dim}")
    return dim, at


def cumsum_dim(node: fx.Node, ndim: int) -> int:
    """``torch.cumsum(x, dim)``'s dim (non-negative); only the plain float form is lowered.

    Raises:
        BackendError: A non-constant dim, or a ``dtype``/``out`` argument.
    """
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise BackendError(f"{node.format_node()}: cumsum needs a constant dim in "
                           f"[-{ndim}, {ndim}), got {dim!r}")
    if node.kwargs.get("dtype") is not None or node.kwargs.get("out") is not None:
        raise BackendError(f"{node.format_node()}: cumsum with dtype= or out= is not lowered")
    return dim % ndim


def clamp_bounds(node: fx.Node, bound: Callable[[Any], Any]) -> tuple[Any, Any]:
    """``torch.clamp(x, min=None, max=None)``'s bounds with number operands (``None`` where not
    given), each read through ``bound`` (a backend's value of an argument).

    Raises:
        BackendError: Neither bound, or a bound that is not a number.
    """
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    lo, hi = (None if b is None else bound(b) for b in (lo, hi))
    for b in (lo, hi):
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))):
            raise BackendError(f"{node.format_node()}: clamp bounds must be numbers, got {b!r}")
    if lo is None and hi is None:
        raise BackendError(f"{node.format_node()}: clamp needs min or max")
    return lo, hi


def binary_alpha(node: fx.Node, name: str) -> float:
    """The ``alpha`` of ``add``/``sub`` (``a + alpha * b``); 1 for every other binary op.

    Raises:
        BackendError: ``alpha`` on another op, not a number, or a ``rounding_mode``.
    """
    alpha = node.kwargs.get("alpha", 1)
    if node.kwargs.get("rounding_mode") is not None:
        raise BackendError(f"{node.format_node()}: division with rounding_mode is not lowered")
    if alpha == 1:
        return 1.0
    if name not in ("add", "subtract") or isinstance(alpha, bool) or \
            not isinstance(alpha, (int, float)):
        raise BackendError(f"{node.format_node()}: alpha={alpha!r} is lowered only as a number "
                           "on add/sub")
    return float(alpha)


def rsub_operand(node: fx.Node) -> Any:
    """``torch.rsub(x, other, alpha=1)`` (``other - x``): the ``other`` argument.

    Raises:
        BackendError: ``alpha`` other than 1.
    """
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        raise BackendError(f"{node.format_node()}: rsub with alpha is not lowered")
    return node.args[1] if len(node.args) > 1 else node.kwargs["other"]


def flip_dims(node: fx.Node, ndim: int) -> list[int]:
    """``torch.flip(x, dims)``'s dims (non-negative, distinct).

    Raises:
        BackendError: Dims that are not constant ints in range, or repeated.
    """
    arg: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    dims: list[Any] = [arg] if isinstance(arg, int) else \
        list(arg) if isinstance(arg, (list, tuple)) else []
    ints = [d for d in dims if isinstance(d, int) and -ndim <= d < ndim]
    if not dims or len(ints) != len(dims) or len({d % ndim for d in ints}) != len(ints):
        raise BackendError(f"{node.format_node()}: flip needs distinct constant dims in "
                           f"[-{ndim}, {ndim}), got {arg!r}")
    return sorted(d % ndim for d in ints)


def _static_pair(node: fx.Node, value: Any, what: str) -> tuple[int, int]:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return int(value[0]), int(value[1])
    raise BackendError(f"{node.format_node()}: {what} must be two static ints, got {value!r}")


def relative_position_index(ctx: LoweringContext, node: fx.Node) -> tuple[np.ndarray, int]:
    """``_get_relative_position_bias(table, index, window_size)``: the constant index (int64,
    flat) and the tokens per window ``N = wh * ww``; the result is
    ``table[index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)``.

    Raises:
        BackendError: A non-constant index, or one that is not ``N * N`` long.
    """
    index = constant_tensor(ctx, node, call_arg(node, 1, "relative_position_index", None),
                            "relative_position_index")
    wh, ww = _static_pair(node, call_arg(node, 2, "window_size", None), "window_size")
    tokens = wh * ww
    if index.dtype.is_floating_point or index.numel() != tokens * tokens:
        raise BackendError(f"{node.format_node()}: relative_position_index must hold "
                           f"{tokens}x{tokens} integer indices, got {index.dtype} "
                           f"{tuple(index.shape)}")
    return index.reshape(-1).to(torch.int64).numpy(), tokens


@dataclass(frozen=True)
class WindowAttentionPlan:
    """What one ``shifted_window_attention`` call computes on an ``(B, H, W, C)`` input.

    Zero-pad bottom/right to ``padded``; roll by ``-shift`` over (H, W); cut into windows of
    ``window`` (``(B * n_windows, N, C)``); ``qkv = x @ qkv_weight^T + qkv_bias`` split into
    heads; scores ``(q * q_scale) @ k^T`` (V1) or ``normalize(q) @ normalize(k)^T * logit_scale``
    (V2, cosine attention); ``+ relative position bias``; ``+ mask`` (``(n_windows, N, N)``, 0 or
    -100, when shifted); softmax; ``@ v``; heads merged; ``@ proj_weight^T + proj_bias``; windows
    merged, rolled back by ``shift``, cropped to ``(H, W)``. Float32 throughout.
    """

    shape: tuple[int, int, int, int]
    window: tuple[int, int]
    heads: int
    shift: tuple[int, int]
    padded: tuple[int, int]
    qkv_weight: np.ndarray
    qkv_bias: np.ndarray | None
    proj_weight: np.ndarray
    proj_bias: np.ndarray | None
    q_scale: float
    logit_scale: np.ndarray | None
    mask: np.ndarray | None

    @property
    def grid(self) -> tuple[int, int]:
        """Windows along H and W."""
        return self.padded[0] // self.window[0], self.padded[1] // self.window[1]

    @property
    def tokens(self) -> int:
        """Tokens per window, ``N``."""
        return self.window[0] * self.window[1]


def _shift_mask(padded: tuple[int, int], window: tuple[int, int],
                shift: tuple[int, int]) -> np.ndarray:
    """torchvision's attention mask of shifted windows: tokens of different regions of the
    rolled map get -100, others 0; ``(n_windows, N, N)`` float32."""
    regions = np.zeros(padded, np.float32)
    label = 0
    for h0, h1 in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[h0:h1, w0:w1] = label
            label += 1
    gh, gw = padded[0] // window[0], padded[1] // window[1]
    grid = regions.reshape(gh, window[0], gw, window[1]).transpose(0, 2, 1, 3)
    per_window = grid.reshape(gh * gw, window[0] * window[1])
    differ = per_window[:, None, :] != per_window[:, :, None]
    return np.where(differ, np.float32(-100.0), np.float32(0.0)).astype(np.float32)


def _float_array(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().float().numpy().copy()


def _check_window_dropout(ctx: LoweringContext, node: fx.Node) -> None:
    training = call_arg(node, 12, "training", True)
    drops = [call_arg(node, 7, "attention_dropout", 0.0), call_arg(node, 8, "dropout", 0.0)]
    if not isinstance(training, bool) or not all(isinstance(p, (int, float)) for p in drops):
        raise BackendError(f"{node.format_node()}: training and the dropout rates must be "
                           "constants; trace the model in eval mode")
    if training and any(p > 0 for p in drops):
        raise BackendError(f"{node.format_node()}: window attention traced with training=True "
                           f"and dropout {drops}: it zeroes random values; convert in eval mode")


def window_attention_plan(ctx: LoweringContext, node: fx.Node,
                          shape: Sequence[int]) -> WindowAttentionPlan:
    """The plan of a ``shifted_window_attention`` node whose input has static ``shape``.

    Raises:
        BackendError: Non-constant weights or sizes, weights that do not fit the input's
            channels, or dropout in training mode.
    """
    if len(shape) != 4:
        raise BackendError(f"{node.format_node()}: expects a (B, H, W, C) input, got {shape}")
    _check_window_dropout(ctx, node)
    b, h, w, c = (int(s) for s in shape)
    window = _static_pair(node, call_arg(node, 4, "window_size", None), "window_size")
    shift = list(_static_pair(node, call_arg(node, 6, "shift_size", None), "shift_size"))
    heads = call_arg(node, 5, "num_heads", None)
    if not isinstance(heads, int) or heads <= 0 or c % heads:
        raise BackendError(f"{node.format_node()}: num_heads {heads!r} does not divide the "
                           f"{c} input channels")
    padded = (h + (-h) % window[0], w + (-w) % window[1])
    for axis in (0, 1):
        if window[axis] >= padded[axis]:
            shift[axis] = 0  # the window covers the map: torchvision does not shift
    weights = {name: constant_tensor(ctx, node, call_arg(node, i, name, None), name)
               for i, name in ((1, "qkv_weight"), (2, "proj_weight"))}
    optional = {name: (None if call_arg(node, i, name, None) is None else
                       constant_tensor(ctx, node, call_arg(node, i, name, None), name))
                for i, name in ((9, "qkv_bias"), (10, "proj_bias"), (11, "logit_scale"))}
    if tuple(weights["qkv_weight"].shape) != (3 * c, c) or \
            tuple(weights["proj_weight"].shape) != (c, c):
        raise BackendError(f"{node.format_node()}: qkv/proj weights "
                           f"{tuple(weights['qkv_weight'].shape)}/"
                           f"{tuple(weights['proj_weight'].shape)} do not fit {c} channels")
    qkv_bias = _float_array(optional["qkv_bias"])
    logit_scale = optional["logit_scale"]
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias[c:2 * c] = 0.0  # V2 has no key bias
    if logit_scale is not None:  # the exact float32 torch computes: exp(min(s, log 100))
        logit_scale = torch.clamp(logit_scale.float(), max=math.log(100.0)).exp()
        if tuple(logit_scale.shape) not in ((heads, 1, 1), (1, heads, 1, 1)):
            raise BackendError(f"{node.format_node()}: logit_scale of shape "
                               f"{tuple(logit_scale.shape)}, expected ({heads}, 1, 1)")
    shift_t = (shift[0], shift[1])
    return WindowAttentionPlan(
        shape=(b, h, w, c), window=window, heads=heads, shift=shift_t, padded=padded,
        qkv_weight=_float_array(weights["qkv_weight"]),  # type: ignore[arg-type]
        qkv_bias=qkv_bias, proj_weight=_float_array(weights["proj_weight"]),  # type: ignore[arg-type]
        proj_bias=_float_array(optional["proj_bias"]),
        q_scale=float((c // heads) ** -0.5), logit_scale=_float_array(logit_scale),
        mask=_shift_mask(padded, window, shift_t) if sum(shift_t) > 0 else None)


# ------------------------------------------------------------------------------ pad, roll, einsum


def pad_widths(node: fx.Node, ndim: int, pad: Any, mode: Any, value: Any) -> list[tuple[int, int]]:
    """``F.pad(x, pad, mode, value)`` as ``(before, after)`` per axis of an ``ndim``-d input
    (torch lists the last axis first). Constant mode with non-negative widths only.

    Raises:
        BackendError: Another mode, negative widths (cropping) or non-static arguments.
    """
    if mode not in ("constant", None) or not isinstance(value, (int, float, type(None))):
        raise BackendError(f"{node.format_node()}: only constant padding with a static value "
                           f"is lowered, got mode={mode!r}, value={value!r}")
    if (not isinstance(pad, (list, tuple)) or len(pad) % 2 or len(pad) // 2 > ndim
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pad)):
        raise BackendError(f"{node.format_node()}: pad must be pairs of static non-negative "
                           f"ints for a {ndim}-d input, got {pad!r}")
    widths = [(0, 0)] * ndim
    for i in range(len(pad) // 2):
        widths[ndim - 1 - i] = (int(pad[2 * i]), int(pad[2 * i + 1]))
    return widths


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def roll_plan(node: fx.Node, shape: Sequence[int], shifts: Any, dims: Any) -> list[tuple[int, int]]:
    """``torch.roll(x, shifts, dims)`` as ``(axis, shift in [0, size))`` per rolled axis:
    ``out = cat(x[size - shift:], x[:size - shift])`` along each axis in turn.

    Raises:
        BackendError: ``dims`` omitted (a roll of the flattened tensor) or non-static arguments.
    """
    shift_list, dim_list = _as_list(shifts), _as_list(dims)
    if dims is None or len(shift_list) != len(dim_list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in shift_list + dim_list):
        raise BackendError(f"{node.format_node()}: roll needs static int shifts and dims of "
                           f"equal length, got shifts={shifts!r}, dims={dims!r}")
    ndim = len(shape)
    return [(d % ndim, s % shape[d % ndim]) for s, d in zip(shift_list, dim_list, strict=True)
            if shape[d % ndim] and s % shape[d % ndim]]


def einsum_equation(node: fx.Node, equation: Any, operands: int) -> str:
    """A ``torch.einsum`` equation with its spaces removed and its subscripts renamed to
    ``a``, ``b``, ... in order of appearance (``"B G H I D, B G H J D -> B G H I J"`` becomes
    ``"abcde,abcfe->abcdf"``), for backends whose einsum accepts lower-case letters only.

    Raises:
        BackendError: A non-static equation, an implicit output (no ``->``), an ellipsis, or
            an operand count that does not match.
    """
    if not isinstance(equation, str):
        raise BackendError(f"{node.format_node()}: einsum needs a static equation")
    compact = equation.replace(" ", "")
    inputs, arrow, output = compact.partition("->")
    if not arrow or "." in compact or len(inputs.split(",")) != operands:
        raise BackendError(f"{node.format_node()}: einsum is lowered with an explicit output, "
                           f"no ellipsis and one term per operand, got {equation!r}")
    names: dict[str, str] = {}
    for ch in inputs + output:
        if ch.isalpha() and ch not in names:
            if len(names) == 26:
                raise BackendError(f"{node.format_node()}: einsum with more than 26 subscripts")
            names[ch] = chr(ord("a") + len(names))
    return "".join(names.get(ch, ch) for ch in compact)

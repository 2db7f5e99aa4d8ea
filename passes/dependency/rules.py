"""Per-op channel rules, keyed by the op (module class, function object or method name).

Every rule has one signature, ``rule(state, node) -> Info``: it reads the infos of the node's
inputs from ``state.info``, records element unions, roles, barriers and the node's zero behaviour,
and returns the info of the node's output. An op without a rule is a barrier (see
``analysis.py``); no op is ever assumed to pass channels through.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from djpq_compiler import op_facts as facts
from djpq_compiler.layers import tensor_shape
from djpq_compiler.passes.dependency.state import AnalysisState, Info, Opaque, Role, Space, Zero
from djpq_compiler.registry import Registry

__all__ = ["RULES", "Rule"]

Rule = Callable[[AnalysisState, fx.Node], Info]
RULES: Registry[Rule] = Registry("channel-dependency")


def _input(st: AnalysisState, node: fx.Node, i: int = 0) -> Info:
    arg = node.args[i] if len(node.args) > i else None
    return st.info.get(arg.name) if isinstance(arg, fx.Node) else None


def _space_at(st: AnalysisState, info: Info, dim: int, size: int, reader: fx.Node) -> Space | None:
    """``info`` as a space on ``dim`` of ``size`` channels; anything else becomes a barrier."""
    if isinstance(info, Space) and info.dim == dim and info.size == size:
        return info
    st.barrier_info(info, f"{reader.name} reads channels that are not tracked as dim {dim}")
    return None


def _module(st: AnalysisState, node: fx.Node) -> nn.Module:
    return st.gm.get_submodule(str(node.target))


_M = TypeVar("_M", bound=nn.Module)


def _module_as(st: AnalysisState, node: fx.Node, cls: type[_M]) -> _M:
    """The module of ``node`` as the class its rule is registered for (a subclass of it)."""
    mod = _module(st, node)
    if not isinstance(mod, cls):  # the registry dispatches on the class: cannot happen
        raise TypeError(f"{node.format_node()}: expected a {cls.__name__}, got "
                        f"{type(mod).__name__}")
    return mod


def _params(module_path: str, mod: nn.Module, names: tuple[str, ...]) -> list[str]:
    prefix = f"{module_path}." if module_path else ""
    return [prefix + n for n in names if isinstance(getattr(mod, n, None), torch.Tensor)]


# --------------------------------------------------------------------------- producers / consumers
def _computed_weight(st: AnalysisState, node: fx.Node, out: Space, x_sp: Space | None) -> Space:
    """A layer whose weight is computed in the graph: neither side can be sliced."""
    for space in (out, x_sp):
        if space is not None:
            st.barrier(space, f"{node.name}: weight is computed in the graph, not a parameter")
    st.zero_kind[node.name] = Zero.NEVER
    return out


def _conv_like(st: AnalysisState, node: fx.Node, *, in_ch: int, out_ch: int, groups: int,
               weight: str | None, bias: str | None, transposed: bool, key: str) -> Info:
    x = _input(st, node)
    out = st.new_space(node, 1, out_ch)
    x_sp = _space_at(st, x, 1, in_ch, node)
    w_out, w_in = (1, 0) if transposed else (0, 1)
    st.module_calls.setdefault(key, []).append((x_sp, out))
    if weight is None:
        return _computed_weight(st, node, out, x_sp)
    if groups == 1:
        st.add_role(out, Role("producer", node.name, weight, w_out))
        if bias is not None:
            st.add_role(out, Role("producer", node.name, bias, 0))
        if x_sp is not None:
            st.add_role(x_sp, Role("consumer", node.name, weight, w_in))
        st.gate_points[node.name] = out
        st.zero_kind[node.name] = Zero.GATE
    elif groups == in_ch and out_ch % in_ch == 0 and not transposed:
        mult = out_ch // in_ch  # depthwise: output channel c*mult+r reads input channel c
        if x_sp is not None:
            st.union(out, x_sp, np.arange(out_ch), np.arange(out_ch) // mult)
        else:
            st.barrier(out, f"{node.name}: depthwise conv input is not tracked")
        st.add_role(out, Role("param", node.name, weight, 0))
        if bias is not None:
            st.add_role(out, Role("param", node.name, bias, 0))
        st.gate_points[node.name] = out
        st.zero_kind[node.name] = Zero.GATE
    else:
        reason = f"{node.name}: grouped conv (groups={groups}) keeps its per-group channel counts"
        st.barrier(out, reason)
        if x_sp is not None:
            st.barrier(x_sp, reason)
        st.zero_kind[node.name] = Zero.NEVER
    return out


@RULES.register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(st: AnalysisState, node: fx.Node) -> Info:
    mod = _module_as(st, node, nn.modules.conv._ConvNd)
    path = str(node.target)
    (w,) = _params(path, mod, ("weight",))
    b = _params(path, mod, ("bias",))
    return _conv_like(st, node, in_ch=mod.in_channels, out_ch=mod.out_channels,
                      groups=mod.groups, weight=w, bias=b[0] if b else None,
                      transposed=False, key=path)


@RULES.register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose_module(st: AnalysisState, node: fx.Node) -> Info:
    mod = _module_as(st, node, nn.modules.conv._ConvNd)
    path = str(node.target)
    b = _params(path, mod, ("bias",))
    return _conv_like(st, node, in_ch=mod.in_channels, out_ch=mod.out_channels,
                      groups=mod.groups, weight=f"{path}.weight",
                      bias=b[0] if b else None, transposed=True, key=path)


def _get_attr_target(arg: object) -> str | None:
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _fn_arg(node: fx.Node, i: int, name: str) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


@RULES.register(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                F.conv_transpose3d)
def conv_functional(st: AnalysisState, node: fx.Node) -> Info:
    transposed = node.target in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
    w_node = _fn_arg(node, 1, "weight")
    wshape = tensor_shape(w_node) or ()
    groups = int(_fn_arg(node, 6, "groups") or 1)  # type: ignore[call-overload]
    if transposed:
        in_ch, out_ch = wshape[0], wshape[1] * groups
    else:
        out_ch, in_ch = wshape[0], wshape[1] * groups
    weight = _exclusive_get_attr(w_node)
    bias_node = _fn_arg(node, 2, "bias")
    bias = _exclusive_get_attr(bias_node)
    if bias_node is not None and bias is None:
        weight = None  # a computed bias cannot be sliced: treat like a computed weight
    return _conv_like(st, node, in_ch=in_ch, out_ch=out_ch, groups=groups, weight=weight,
                      bias=bias, transposed=transposed, key=weight or node.name)


def _exclusive_get_attr(arg: object) -> str | None:
    """The get_attr target of ``arg`` if it is a parameter read by this node only."""
    target = _get_attr_target(arg)
    if target is None or not isinstance(arg, fx.Node) or len(arg.users) != 1:
        return None
    return target


def _linear(st: AnalysisState, node: fx.Node, weight: str | None, bias: str | None,
            in_f: int, out_f: int, key: str) -> Info:
    x = _input(st, node)
    in_shape = tensor_shape(node.args[0]) or (in_f,)
    out_shape = tensor_shape(node) or (out_f,)
    out = st.new_space(node, len(out_shape) - 1, out_f)
    x_sp = _space_at(st, x, len(in_shape) - 1, in_f, node)
    st.module_calls.setdefault(key, []).append((x_sp, out))
    if weight is None:
        return _computed_weight(st, node, out, x_sp)
    st.add_role(out, Role("producer", node.name, weight, 0))
    if bias is not None:
        st.add_role(out, Role("producer", node.name, bias, 0))
    if x_sp is not None:
        st.add_role(x_sp, Role("consumer", node.name, weight, 1))
    st.gate_points[node.name] = out
    st.zero_kind[node.name] = Zero.GATE
    return out


@RULES.register(nn.Linear)
def linear_module(st: AnalysisState, node: fx.Node) -> Info:
    mod = _module_as(st, node, nn.Linear)
    path = str(node.target)
    b = _params(path, mod, ("bias",))
    return _linear(st, node, f"{path}.weight", b[0] if b else None, mod.in_features,
                   mod.out_features, path)


@RULES.register(F.linear)
def linear_functional(st: AnalysisState, node: fx.Node) -> Info:
    w_node = _fn_arg(node, 1, "weight")
    out_f, in_f = tensor_shape(w_node) or (0, 0)
    weight = _exclusive_get_attr(w_node)
    bias_node = _fn_arg(node, 2, "bias")
    bias = _exclusive_get_attr(bias_node)
    if bias_node is not None and bias is None:
        weight = None
    return _linear(st, node, weight, bias, in_f, out_f, weight or node.name)


# --------------------------------------------------------------------------- per-channel affine
@RULES.register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def per_channel_norm(st: AnalysisState, node: fx.Node) -> Info:
    """BN / InstanceNorm: channels pass through; parameters are sliced; a gate sits after it.

    A conv/linear whose only user is this norm moves its gate point here (DESIGN invariant 3:
    the gate multiplies after conv and BN, before the nonlinearity).
    """
    mod = _module_as(st, node, nn.modules.batchnorm._NormBase)
    path = str(node.target)
    x = _input(st, node)
    size = int(mod.num_features)
    x_sp = _space_at(st, x, 1, size, node)
    out = st.new_space(node, 1, size)
    st.module_calls.setdefault(path, []).append((x_sp, out))
    if x_sp is None:
        st.barrier(out, f"{node.name}: input channels are not tracked")
        st.zero_kind[node.name] = Zero.NEVER
        return out
    st.union(out, x_sp)
    for p in _params(path, mod, ("weight", "bias", "running_mean", "running_var")):
        st.add_role(out, Role("param", node.name, p, 0))
    producer = node.args[0]
    if isinstance(producer, fx.Node) and producer.name in st.gate_points \
            and len(producer.users) == 1:
        del st.gate_points[producer.name]
        st.zero_kind[producer.name] = Zero.NEVER
    st.gate_points[node.name] = out
    st.zero_kind[node.name] = Zero.GATE
    return out


@RULES.register(F.batch_norm, F.instance_norm)
def functional_norm(st: AnalysisState, node: fx.Node) -> Info:
    """``F.batch_norm`` / ``F.instance_norm`` left functional (``passes/functional_norms.py``
    turns the common case into a module first): channels on dim 1 pass through, the per-channel
    tensors are sliced with them when each is a ``get_attr`` read by this call only (else the
    space is a barrier), and zero is not preserved (the shift), so no gate moves here."""
    x = _input(st, node)
    shape = tensor_shape(node)
    if not isinstance(x, Space) or shape is None or len(shape) < 2 or x.dim != 1:
        if x is not None and not isinstance(x, Opaque):
            st.barrier_info(x, f"{node.name}: channels not tracked on dim 1")
        return Opaque(f"output of {node.name}")
    out = st.new_space(node, 1, x.size)
    st.union(out, x)
    for i, name in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
        arg = _fn_arg(node, i, name)
        if arg is None:
            continue
        target = _exclusive_get_attr(arg)
        if target is None:
            st.barrier(out, f"{node.name}: its {name} is not a parameter it alone reads")
        else:
            st.add_role(out, Role("param", node.name, target, 0))
    st.zero_kind[node.name] = Zero.NEVER
    return out


# --------------------------------------------------------------------------- elementwise unary
def _pass_through(st: AnalysisState, node: fx.Node, zero: Zero) -> Info:
    x = _input(st, node)
    in_shape = tensor_shape(node.args[0]) if node.args else None
    out_shape = tensor_shape(node)
    if not isinstance(x, Space) or in_shape is None or out_shape is None:
        if x is not None and not isinstance(x, Opaque):
            st.barrier_info(x, f"{node.name}: channels not tracked as one dimension")
        return Opaque(f"output of {node.name}")
    dim = x.dim + len(out_shape) - len(in_shape)
    if dim < 0 or dim >= len(out_shape) or out_shape[dim] != x.size:
        st.barrier(x, f"{node.name}: output does not keep the channel dimension")
        return Opaque(f"output of {node.name}")
    out = st.new_space(node, dim, x.size)
    st.union(out, x)
    st.zero_kind[node.name] = zero
    return out


ZERO_PRESERVING = facts.ZERO_PRESERVING
NOT_ZERO_PRESERVING = facts.NOT_ZERO_PRESERVING


@RULES.register(*ZERO_PRESERVING)
def unary_zero_preserving(st: AnalysisState, node: fx.Node) -> Info:
    return _pass_through(st, node, Zero.SAME)


@RULES.register(*NOT_ZERO_PRESERVING)
def unary_not_zero_preserving(st: AnalysisState, node: fx.Node) -> Info:
    return _pass_through(st, node, Zero.NEVER)


@RULES.register(nn.PReLU)
def prelu(st: AnalysisState, node: fx.Node) -> Info:
    out = _pass_through(st, node, Zero.SAME)
    mod = _module_as(st, node, nn.PReLU)
    if isinstance(out, Space) and mod.num_parameters > 1:
        st.add_role(out, Role("param", node.name, f"{node.target}.weight", 0))
        st.module_calls.setdefault(str(node.target), []).append((None, out))
    return out


@RULES.register(torch.clamp, torch.clip, "clamp", "clip", "clamp_")
def clamp(st: AnalysisState, node: fx.Node) -> Info:
    lo = _fn_arg(node, 1, "min")
    hi = _fn_arg(node, 2, "max")
    keeps_zero = (lo is None or (isinstance(lo, (int, float)) and lo <= 0)) and \
        (hi is None or (isinstance(hi, (int, float)) and hi >= 0))
    return _pass_through(st, node, Zero.SAME if keeps_zero else Zero.NEVER)


# --------------------------------------------------------------------------- metadata reads
@RULES.register(builtins.getattr, "size", "dim", "numel", "ndimension")
def metadata(st: AnalysisState, node: fx.Node) -> Info:
    """Reading sizes does not touch channels (a dynamic size follows the pruned tensor)."""
    return None


# --------------------------------------------------------------------------- reductions
def _reduced_dims(node: fx.Node, ndim: int) -> tuple[int, ...] | None:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)  # type: ignore[arg-type]
    return tuple(int(d) % ndim for d in dims)  # type: ignore[arg-type]


@RULES.register(torch.mean, "mean", torch.sum, "sum", torch.amax, "amax", torch.amin, "amin")
def reduction(st: AnalysisState, node: fx.Node) -> Info:
    """Reducing spatial dims keeps channels (zero stays zero); reducing channels is a barrier."""
    x = _input(st, node)
    in_shape = tensor_shape(node.args[0])
    dims = _reduced_dims(node, len(in_shape)) if in_shape else None
    if not isinstance(x, Space) or dims is None or x.dim in dims:
        st.barrier_info(x, f"{node.name} reduces over the channel dimension")
        return Opaque(f"output of {node.name}")
    keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
    dim = x.dim if keepdim else x.dim - sum(1 for d in dims if d < x.dim)
    out = st.new_space(node, dim, x.size)
    st.union(out, x)
    st.zero_kind[node.name] = Zero.SAME
    return out


# --------------------------------------------------------------------------- known barriers
@RULES.register(nn.LayerNorm, F.layer_norm, nn.GroupNorm, F.group_norm, nn.LocalResponseNorm,
                F.softmax, nn.Softmax, "softmax", torch.softmax, nn.MultiheadAttention,
                torch.matmul, operator.matmul, torch.bmm, "matmul", torch.einsum,
                F.scaled_dot_product_attention)
def mixing_barrier(st: AnalysisState, node: fx.Node) -> Info:
    """Ops that mix channels (normalize across them, attend over them): known barriers.

    Unlike an op with no rule, these are understood: their inputs cannot lose channels because
    every output depends on all of them, and their outputs are new, untracked channel sets.
    """
    for arg in node.all_input_nodes:
        st.barrier_info(st.info.get(arg.name), f"{node.name} mixes channels "
                                                "(normalization/attention/matmul)")
    return Opaque(f"output of {node.name}")


def _register_torchvision() -> None:
    """Rules for torchvision's ``torch.fx.wrap``-ed functions (leaf calls in traced graphs)."""
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is optional
        return
    RULES.register(stochastic_depth)(unary_zero_preserving)
    # Swin: windowed attention mixes channels; patch merging interleaves 2x2 neighbours into
    # channels (its LayerNorm fixes those channels anyway); the bias table is not activations.
    mixing = [getattr(swin_transformer, name, None) for name in (
        "shifted_window_attention", "_patch_merging_pad", "_get_relative_position_bias")]
    RULES.register(*[fn for fn in mixing if fn is not None])(mixing_barrier)


_register_torchvision()


# The binary and shape rules live in their own files and register into RULES on import.
from djpq_compiler.passes.dependency import rules_binary, rules_shape  # noqa: E402,F401

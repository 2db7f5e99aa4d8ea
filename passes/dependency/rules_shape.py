"""Channel rules for shape ops, computed by running the op on id fields (see ``fields.py``).

Three kinds, by what pruning must do to them afterwards:

* ``AUTO`` (flatten, permute, cat, ...): re-executes correctly on pruned inputs.
* ``RESHAPE`` (view, reshape): a literal size at the channel position is rewritten by ``prune``.
* ``SELECT`` (getitem, narrow, split, chunk): a proper channel selection is rewritten by ``prune``
  as an ``index_select`` of the kept positions.

A channel dimension split into several dimensions (the first ``view`` of a channel shuffle) is
carried as an unresolved field; whatever comes out of it is a barrier, because the literal sizes
of the intermediate views cannot follow an arbitrary pruning.
"""

from __future__ import annotations

import enum
import operator

import numpy as np
import torch
import torch.fx as fx

from djpq_compiler import op_facts as facts
from djpq_compiler.layers import tensor_shape
from djpq_compiler.passes.dependency.fields import clean_dim, evaluate_on_fields, line_along
from djpq_compiler.passes.dependency.rules import RULES
from djpq_compiler.passes.dependency.state import (
    AnalysisState,
    Field,
    Info,
    Opaque,
    Role,
    Space,
    Zero,
)

__all__ = ["ShapeKind"]


class ShapeKind(enum.Enum):
    AUTO = "auto"
    RESHAPE = "reshape"
    SELECT = "select"


def _shape_rule(st: AnalysisState, node: fx.Node, kind: ShapeKind) -> Info:
    if kind is ShapeKind.SELECT and any(
        tensor_shape(a) is not None for a in node.all_input_nodes[1:]
    ):
        return _give_up(st, node, "indexes channels with a tensor")
    result = evaluate_on_fields(st, node)
    if result is None:
        return _give_up(st, node, "has arguments of unknown value")
    if isinstance(result, torch.Tensor):
        return _tensor_result(st, node, result, kind)
    if isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
        st.zero_kind[node.name] = Zero.SAME
        return tuple(Field(r, piece=True) for r in result)
    return None


def _give_up(st: AnalysisState, node: fx.Node, why: str) -> Info:
    for arg in node.all_input_nodes:
        st.barrier_info(st.info.get(arg.name), f"{node.name} {why}")
    return Opaque(f"output of {node.name}")


def _tensor_result(st: AnalysisState, node: fx.Node, ids: torch.Tensor, kind: ShapeKind) -> Info:
    st.zero_kind[node.name] = Zero.SAME
    d = clean_dim(ids)
    if d is None:
        if bool((ids < 0).all()):
            return Opaque(f"output of {node.name}")
        return Field(ids)
    v = line_along(ids, d)
    if bool((v < 0).all()):
        return Opaque(f"output of {node.name}")
    space = st.new_space(node, d, len(v))
    known = v >= 0
    st.union_ids(space.ids()[known], v[known])
    if not known.all():
        st.barrier(space, f"{node.name} mixes tracked channels with untracked ones")
    inputs = [st.info.get(a.name) for a in node.all_input_nodes]
    from_field = any(isinstance(i, Field) and not i.piece for i in inputs)
    if from_field:
        st.barrier(space, f"{node.name}: channels went through a reshape that splits the "
                          "channel dimension (e.g. channel shuffle); its sizes cannot follow "
                          "pruning")
    if kind is ShapeKind.RESHAPE:
        st.add_role(space, Role("reshape", node.name, node.name, d))
        derived = _derived_channel_sizes(st, node, d)
        if derived:
            st.barrier(space, f"{node.name}: shape argument {derived} is computed from a channel "
                              "count (e.g. size(1) // groups); it cannot follow pruning")
    if _in_order(st, v[known]):
        return space
    if kind is ShapeKind.SELECT and _direct_select(st, node, space, v):
        return space
    if kind is not ShapeKind.AUTO or from_field:
        st.barrier(space, f"{node.name} reorders or selects channels in a way pruning cannot "
                          "rewrite")
    return space


def _size_read(st: AnalysisState, node: fx.Node) -> int | None:
    """The channel count a metadata node reads: ``x.size(c)`` / ``x.shape[c]`` / ``x.size()[c]``
    where ``c`` is ``x``'s tracked channel dim; ``None`` otherwise."""
    if node.op == "call_method" and node.target == "size" and len(node.args) > 1:
        src, dim = node.args[0], node.args[1]
    elif node.op == "call_function" and node.target is operator.getitem and \
            isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int):
        inner = node.args[0]
        if not ((inner.op == "call_method" and inner.target == "size" and len(inner.args) == 1)
                or (inner.op == "call_function" and inner.args[1:] == ("shape",))):
            return None
        src, dim = inner.args[0], node.args[1]
    else:
        return None
    info = st.info.get(src.name) if isinstance(src, fx.Node) else None
    shape = tensor_shape(src)
    if isinstance(info, Space) and shape is not None and isinstance(dim, int) \
            and dim % len(shape) == info.dim:
        return info.size
    return None


def _derived_channel_sizes(st: AnalysisState, node: fx.Node, d: int) -> str | None:
    """A shape argument of a reshape that depends on a channel count other than by being that
    count at the output's channel position (``view(n, c // g, g, ...)`` in a channel shuffle)."""
    shape_args = node.args[1:]
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = tuple(shape_args[0])
    for position, arg in enumerate(shape_args):
        if not isinstance(arg, fx.Node):
            continue
        if position == d and _size_read(st, arg) is not None:
            continue  # the channel count itself, where the channels are: follows pruning
        stack, seen = [arg], set()
        while stack:
            cur = stack.pop()
            if cur.name in seen or tensor_shape(cur) is not None:
                continue
            seen.add(cur.name)
            if _size_read(st, cur) is not None:
                return arg.name
            stack.extend(cur.all_input_nodes)
    return None


def _in_order(st: AnalysisState, v: np.ndarray) -> bool:
    """Every origin space's channels appear completely and in order (cat, flatten, identity)."""
    owners = st.space_of_ids(v)
    for sid in np.unique(owners).tolist():
        vals = v[owners == sid]
        origin = st.spaces[sid]
        if np.any(np.diff(vals) < 0) or not np.array_equal(np.unique(vals), origin.ids()):
            return False
    return True


def _direct_select(st: AnalysisState, node: fx.Node, space: Space, v: np.ndarray) -> bool:
    """A selection of channels straight from one tensor: rewritable as ``index_select``."""
    src = node.args[0]
    if isinstance(src, fx.Node) and isinstance(st.info.get(src.name), tuple):
        src = src.args[0]  # getitem on the result of split/chunk
    if not isinstance(src, fx.Node) or (v < 0).any():
        return False
    origin = st.info.get(src.name)
    if not isinstance(origin, Space) or origin.dim != space.dim:
        return False
    owners = st.space_of_ids(v)
    src_shape, out_shape = tensor_shape(src), tensor_shape(node)
    if src_shape is None or out_shape is None or len(src_shape) != len(out_shape):
        return False
    same_elsewhere = all(a == b for i, (a, b) in enumerate(zip(src_shape, out_shape, strict=True))
                         if i != space.dim)
    if not same_elsewhere or not np.all(owners == origin.id) or len(np.unique(v)) != len(v):
        return False
    st.add_role(space, Role("select", node.name, src.name, space.dim,
                            tuple(int(i) for i in v - origin.base)))
    return True


AUTO_OPS = facts.LAYOUT
RESHAPE_OPS = facts.RESHAPE
SELECT_OPS = facts.SELECT


@RULES.register(*AUTO_OPS)
def shape_auto(st: AnalysisState, node: fx.Node) -> Info:
    return _shape_rule(st, node, ShapeKind.AUTO)


@RULES.register(*RESHAPE_OPS)
def shape_reshape(st: AnalysisState, node: fx.Node) -> Info:
    return _shape_rule(st, node, ShapeKind.RESHAPE)


@RULES.register(*SELECT_OPS)
def shape_select(st: AnalysisState, node: fx.Node) -> Info:
    return _shape_rule(st, node, ShapeKind.SELECT)

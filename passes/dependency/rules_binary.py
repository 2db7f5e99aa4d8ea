"""Channel rules for broadcasting binary ops (add, sub, mul, div): residuals, SE blocks, scales."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from djpq_compiler.layers import tensor_shape
from djpq_compiler.passes.dependency.rules import RULES
from djpq_compiler.passes.dependency.state import AnalysisState, Info, Opaque, Role, Space, Zero

__all__ = ["binary_add", "binary_mul", "binary_div"]


def _operands(node: fx.Node) -> list[object]:
    ops: list[object] = list(node.args[:2])
    for key in ("other", "input"):
        if key in node.kwargs:
            ops.append(node.kwargs[key])
    return ops


def _channel_dim(st: AnalysisState, node: fx.Node, operands: list[object]) -> int | None:
    out_shape = tensor_shape(node)
    if out_shape is None:
        return None
    for op in operands:
        info = st.info.get(op.name) if isinstance(op, fx.Node) else None
        shape = tensor_shape(op)
        if isinstance(info, Space) and shape is not None:
            dim = info.dim + len(out_shape) - len(shape)
            if out_shape[dim] == info.size:
                return dim
    return None


def _param_space(st: AnalysisState, op: fx.Node, dim: int, size: int) -> Space:
    """The space of a ``get_attr`` tensor broadcast against tracked channels (layer scales...)."""
    existing = st.info.get(op.name)
    if isinstance(existing, Space) and existing.dim == dim:
        return existing
    space = st.new_space(op, dim, size)
    st.info[op.name] = space
    st.zero_kind[op.name] = Zero.NEVER
    st.add_role(space, Role("param", op.name, str(op.target), dim))
    if isinstance(existing, Space):
        st.barrier(space, f"{op.name}: parameter broadcast along two different dimensions")
    return space


def _binary(st: AnalysisState, node: fx.Node, zero: Zero) -> Info:
    operands = _operands(node)
    out_shape = tensor_shape(node)
    dim = _channel_dim(st, node, operands)
    if out_shape is None or dim is None:
        for op in operands:
            if isinstance(op, fx.Node):
                st.barrier_info(st.info.get(op.name), f"{node.name}: channels not tracked")
        return Opaque(f"output of {node.name}")
    out = st.new_space(node, dim, out_shape[dim])
    for position, op in enumerate(operands):
        _link_operand(st, node, out, op, position, zero)
    st.zero_kind[node.name] = zero
    return out


def _link_operand(st: AnalysisState, node: fx.Node, out: Space, op: object, position: int,
                  zero: Zero) -> None:
    affects_zero = zero is Zero.SAME or (zero is Zero.FIRST and position == 0)
    shape = tensor_shape(op)
    if not isinstance(op, fx.Node) or shape is None:
        if affects_zero and isinstance(op, (int, float)) and op != 0:
            st.external_nonzero.add(node.name)  # x + c, c / x
        return
    op_dim = out.dim - (len(tensor_shape(node) or ()) - len(shape))
    if op_dim < 0 or shape[op_dim] == 1:  # broadcast along channels: not part of the group
        if affects_zero:
            st.external_nonzero.add(node.name)
        return
    info = st.info.get(op.name)
    if op.op == "get_attr" and not isinstance(info, Space):
        info = _param_space(st, op, op_dim, shape[op_dim])
    if isinstance(info, Space) and info.dim == op_dim and info.size == out.size:
        st.union(out, info)
        return
    st.barrier(out, f"{node.name}: operand {op.name} has channels that are not tracked")
    st.barrier_info(info, f"{node.name}: combined with untracked channels")


@RULES.register(operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
                "add", "add_", "sub", "sub_")
def binary_add(st: AnalysisState, node: fx.Node) -> Info:
    """Sum: zero only if every operand is zero (a broadcast or constant operand breaks it)."""
    return _binary(st, node, Zero.SAME)


@RULES.register(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def binary_mul(st: AnalysisState, node: fx.Node) -> Info:
    """Product (SE gating, layer scale): zero if any tracked operand is zero."""
    return _binary(st, node, Zero.ANY)


@RULES.register(operator.truediv, operator.itruediv, torch.div, "div", "div_")
def binary_div(st: AnalysisState, node: fx.Node) -> Info:
    """Quotient: zero iff the numerator is zero."""
    return _binary(st, node, Zero.FIRST)

"""Insert-gates pass: one VIB gate per prunable channel group, multiplied in at every gate point.

Requires: the channel groups of the dependency analysis (``dependency/analyze.py``) of this
graph (node names unchanged).
Guarantees: ``gm.djpq_gates`` is an ``nn.ModuleDict`` holding one
:class:`~djpq_compiler.modules.gates.VIBGate` per prunable group, keyed ``"g<group id>"`` with
``group.size`` atoms and ``required`` set to the atom sets of members covering only part of the
group (each keeps at least one atom at conversion). After every gate point of such a group a
``call_module`` node ``djpq_gates.g<id>(x, index, dim=member.dim)`` multiplies the output, and
every former user of the gate point reads the gated value (DESIGN invariant 3: after conv/linear
*and* its BN, before any nonlinearity). ``index`` is a non-persistent long buffer
``_djpq_gate_index_<node>`` mapping each channel of the member to its atom, or ``None`` where that
map is the identity. All producers of a group share the one gate instance.
The returned record maps group id -> gate module path.
The graph is linted and recompiled.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from djpq_compiler.config import GateSpec
from djpq_compiler.errors import PruningError
from djpq_compiler.modules.gates import VIBGate
from djpq_compiler.passes.dependency.groups import ChannelGroup, Member
from djpq_compiler.passes.pipeline import Recorded

__all__ = ["insert_gates", "GATES_ATTR", "gate_path"]

#: Attribute of the prepared ``GraphModule`` holding the gates.
GATES_ATTR = "djpq_gates"


def gate_path(group_id: int) -> str:
    """Qualified submodule path of the gate of group ``group_id``."""
    return f"{GATES_ATTR}.g{group_id}"


def _index_arg(gm: fx.GraphModule, group: ChannelGroup, member: Member,
               after: fx.Node) -> fx.Node | None:
    """A ``get_attr`` of the member's atom index, or ``None`` for the identity map."""
    if member.index == tuple(range(group.size)):
        return None
    name = f"_djpq_gate_index_{member.node}"
    gm.register_buffer(name, torch.tensor(member.index, dtype=torch.long), persistent=False)
    with gm.graph.inserting_after(after):
        return gm.graph.get_attr(name)


def _required_atoms(group: ChannelGroup) -> tuple[tuple[int, ...], ...]:
    """The atom sets of members that cover only part of the group (concat branches, split
    pieces): pruning all of one would leave a layer with zero channels."""
    sets = {tuple(sorted(set(m.index))) for m in group.members if m.index}
    return tuple(sorted(s for s in sets if len(s) < group.size))


def _gate_after(gm: fx.GraphModule, group: ChannelGroup, node: fx.Node) -> fx.Node:
    member = group.member(node.name)
    index = _index_arg(gm, group, member, node)
    with gm.graph.inserting_after(index if index is not None else node):
        gated = gm.graph.call_module(gate_path(group.id), (node, index), {"dim": member.dim})
    node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
    return gated


def insert_gates(gm: fx.GraphModule, groups: tuple[ChannelGroup, ...],
                 spec: GateSpec | None = None) -> Recorded[dict[int, str]]:
    """Insert one shared VIB gate per prunable group after each of its gate points.

    Args:
        gm: A captured graph.
        groups: Its channel groups (``dependency_analysis(gm).record.groups``).
        spec: Gate initialisation (default :class:`~djpq_compiler.config.GateSpec`).

    Returns:
        ``Recorded(gm, {group id: gate module path})`` (empty when no group is prunable).

    Raises:
        PruningError: a gate point is not in the graph (groups of another graph).
    """
    spec = spec or GateSpec()
    nodes = {n.name: n for n in gm.graph.nodes}
    gates = nn.ModuleDict()
    paths: dict[int, str] = {}
    for group in groups:
        if not group.prunable:
            continue
        gate = VIBGate.from_spec(group.size, spec)
        gate.required = _required_atoms(group)
        gates[f"g{group.id}"] = gate
        paths[group.id] = gate_path(group.id)
    gm.add_module(GATES_ATTR, gates)
    for group in groups:
        if group.id not in paths:
            continue
        for point in group.gate_points:
            if point not in nodes:
                raise PruningError(f"gate point {point!r} of group {group.id} is not in the graph;"
                                   " was the graph changed after dependency_analysis?")
            _gate_after(gm, group, nodes[point])
    gm.graph.lint()
    gm.recompile()
    return Recorded(gm, paths, bool(paths))

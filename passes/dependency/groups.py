"""Channel groups: the frozen result of the dependency analysis.

Elements joined by rules form *atoms* (kept or removed together); spaces joined by any element
form *groups* (connected components of a networkx graph of channel spaces). A group is prunable
when no member is a barrier, a gate covers every atom, and zero is preserved from the gates to
every consumer (DESIGN invariant 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch.fx as fx

from djpq_compiler.passes.dependency.state import AnalysisState, Role, Space, Zero

__all__ = ["Member", "ChannelGroup", "build_groups", "atom_labels", "zero_flags", "atom_mask"]


@dataclass(frozen=True)
class Member:
    """One channel space of a group.

    Attributes:
        node: FX node name whose output holds these channels.
        dim: The channel dimension of that output.
        index: For each channel of this space, the group atom it belongs to.
        roles: What pruning does at this space (producers, consumers, params, gates, rewrites).
    """

    node: str
    dim: int
    index: tuple[int, ...]
    roles: tuple[Role, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or removed together across the graph.

    Attributes:
        id: Group number (stable for a given graph).
        size: Number of atoms (independently removable channel sets) — the gate's length.
        members: Every channel space in the group.
        prunable: Whether ``prune`` may remove atoms of this group.
        reason: Why not, when ``prunable`` is False.
        gate_points: Nodes after whose output a gate multiplies (producers, depthwise convs,
            norms), in graph order.
    """

    id: int
    size: int
    members: tuple[Member, ...]
    prunable: bool
    reason: str | None
    gate_points: tuple[str, ...]

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(m.node for m in self.members)

    def roles(self, kind: str) -> tuple[Role, ...]:
        return tuple(r for m in self.members for r in m.roles if r.kind == kind)

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.node for r in self.roles("producer")))

    @property
    def consumers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.node for r in self.roles("consumer")))

    def member(self, node: str) -> Member:
        for m in self.members:
            if m.node == node:
                return m
        raise KeyError(f"{node!r} is not a member of group {self.id}")


def atom_labels(st: AnalysisState) -> np.ndarray:
    """Union-find over all channel elements (vectorized min-label propagation)."""
    labels = np.arange(st.n_elements, dtype=np.int64)
    if not st.pairs_a:
        return labels
    a = np.concatenate(st.pairs_a)
    b = np.concatenate(st.pairs_b)
    while True:
        m = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, m)
        np.minimum.at(labels, b, m)
        labels = labels[labels]  # pointer jumping
        if np.array_equal(labels, before):
            return labels


def zero_flags(st: AnalysisState) -> dict[str, bool]:
    """Whether each tracked node's removed channels are zero in the gated (masked) model."""
    zero: dict[str, bool] = {}
    for node in st.gm.graph.nodes:
        kind = st.zero_kind.get(node.name)
        if kind is None:
            continue
        ins = [zero.get(a.name, False) for a in node.all_input_nodes
               if a.meta.get("tensor_meta") is not None]
        if node.name in st.gate_points:
            zero[node.name] = True
        elif kind is Zero.SAME:
            zero[node.name] = bool(ins) and all(ins) and node.name not in st.external_nonzero
        elif kind is Zero.ANY:
            zero[node.name] = any(ins)
        elif kind is Zero.FIRST:
            zero[node.name] = bool(ins) and ins[0] and node.name not in st.external_nonzero
        else:
            zero[node.name] = False
    return zero


def _components(st: AnalysisState) -> list[list[int]]:
    graph = nx.Graph()
    graph.add_nodes_from(range(len(st.spaces)))
    graph.add_edges_from(st.space_edges)
    comps = [sorted(c) for c in nx.connected_components(graph)]
    return sorted(comps, key=lambda c: c[0])


def _unprunable_reason(st: AnalysisState, spaces: list[Space], index: dict[int, np.ndarray],
                       zero: dict[str, bool], size: int) -> str | None:
    for s in spaces:
        if s.id in st.barriers:
            return st.barriers[s.id][0]
    gated = [s for s in spaces if st.gate_points.get(s.node) is s]
    if not gated:
        return "no gate point (no conv/linear/norm produces these channels)"
    covered = np.zeros(size, dtype=bool)
    for s in gated:
        covered[index[s.id]] = True
    if not covered.all():
        return "some channels are not produced behind a gate"
    for s in spaces:
        for role in st.roles.get(s.id, []):
            if role.kind == "consumer" and not zero.get(s.node, False):
                return (f"zero is not preserved from the gates to consumer {role.node} "
                        f"(a non-zero-preserving op such as sigmoid, a constant or an ungated "
                        f"norm lies in between at {s.node})")
    return None


def build_groups(st: AnalysisState) -> tuple[ChannelGroup, ...]:
    """Freeze the analysis state into :class:`ChannelGroup` records."""
    labels = atom_labels(st)
    zero = zero_flags(st)
    order = {n.name: i for i, n in enumerate(st.gm.graph.nodes)}
    groups = []
    for gid, comp in enumerate(_components(st)):
        spaces = sorted((st.spaces[i] for i in comp), key=lambda s: (order.get(s.node, -1), s.id))
        atoms = np.unique(np.concatenate([labels[s.base:s.base + s.size] for s in spaces]))
        index = {s.id: np.searchsorted(atoms, labels[s.base:s.base + s.size]) for s in spaces}
        reason = _unprunable_reason(st, spaces, index, zero, len(atoms))
        members = tuple(
            Member(s.node, s.dim, tuple(index[s.id].tolist()),
                   tuple(st.roles.get(s.id, ())))
            for s in spaces
        )
        gates = tuple(s.node for s in spaces if st.gate_points.get(s.node) is s)
        groups.append(ChannelGroup(gid, len(atoms), members, reason is None, reason, gates))
    return tuple(groups)


def node_order(gm: fx.GraphModule) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(gm.graph.nodes)}


def atom_mask(group: ChannelGroup, keep: Sequence[int]) -> np.ndarray:
    """Boolean mask over ``group``'s atoms, true for the atoms in ``keep``."""
    mask = np.zeros(group.size, dtype=bool)
    mask[np.asarray(list(keep), dtype=np.int64)] = True
    return mask

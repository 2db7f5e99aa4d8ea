"""Prune pass: physically remove channels from every member of their group.

Requires: the channel groups of this graph (``dependency_analysis``) and shapes from the capture
pass. The groups describe the graph before pruning: do not reuse them afterwards.
Guarantees: parameters of producers (output rows), consumers (input columns) and per-channel
ops (norms, depthwise convs, PReLU, get_attr scales) are sliced to the kept channels; module
attributes (``out_channels``, ``in_features``, ``groups``, ``num_features`` ...) follow; literal
channel sizes in ``view``/``reshape`` are rewritten; channel selections (``x[:, a:b]``, split)
become ``index_select`` of the kept positions. Validation happens before any change, so a bad
request leaves the graph untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import PruningError
from djpq_compiler.passes.dependency.groups import ChannelGroup, atom_mask
from djpq_compiler.passes.dependency.state import Role

__all__ = ["prune_graph", "validate_keep"]


def validate_keep(groups: Sequence[ChannelGroup], keep: Mapping[int, Sequence[int]]) -> None:
    """Raise :class:`PruningError` for any request that does not fit the groups."""
    for gid, atoms in keep.items():
        if not isinstance(gid, int) or not 0 <= gid < len(groups):
            raise PruningError(f"keep names group {gid!r}, but groups are 0..{len(groups) - 1}")
        group = groups[gid]
        idx = list(atoms)
        if not group.prunable and sorted(idx) != list(range(group.size)):
            raise PruningError(f"group {gid} (nodes {sorted(group.nodes)[:4]}...) is not prunable: "
                               f"{group.reason}; keep all of its channels or leave it out")
        if not idx:
            raise PruningError(f"keep[{gid}] is empty: a group must keep at least one channel")
        if len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= group.size:
            raise PruningError(
                f"keep[{gid}] must be distinct channel indices in 0..{group.size - 1}"
            )
        _check_no_empty_member(group, idx)


def _check_no_empty_member(group: ChannelGroup, atoms: Sequence[int]) -> None:
    """A member that would lose every channel (one branch of a concat, one piece of a split)
    would leave a layer with zero channels: refuse it, naming the member."""
    mask = atom_mask(group, atoms)
    for member in group.members:
        if member.index and not mask[np.asarray(member.index, dtype=np.int64)].any():
            own = sorted(set(member.index))
            raise PruningError(
                f"keep[{group.id}] removes every channel of {member.node!r} (a member of group "
                f"{group.id}, e.g. one branch of a concat or one piece of a split); a layer "
                f"cannot have zero channels. Keep at least one of its atoms {own[:8]}"
                f"{'...' if len(own) > 8 else ''}.")


def _collect(groups: Sequence[ChannelGroup], keep: Mapping[int, Sequence[int]]
             ) -> tuple[dict[tuple[str, int], np.ndarray], list[tuple[Role, int]],
                        list[tuple[Role, np.ndarray]]]:
    slices: dict[tuple[str, int], np.ndarray] = {}
    reshapes: list[tuple[Role, int]] = []
    selects: list[tuple[Role, np.ndarray]] = []
    for gid, atoms in keep.items():
        group = groups[gid]
        mask = atom_mask(group, atoms)
        for member in group.members:
            elem_keep = mask[np.asarray(member.index, dtype=np.int64)]
            for role in member.roles:
                if role.kind in ("producer", "consumer", "param"):
                    slices[(role.target, role.dim)] = np.nonzero(elem_keep)[0]
                elif role.kind == "reshape":
                    reshapes.append((role, int(elem_keep.sum())))
                elif role.kind == "select":
                    src_keep = mask[np.asarray(group.member(role.target).index, dtype=np.int64)]
                    positions = np.cumsum(src_keep) - 1
                    src = np.asarray(role.source_index, dtype=np.int64)[elem_keep]
                    selects.append((role, positions[src]))
    return slices, reshapes, selects


def _slice_tensor(gm: fx.GraphModule, target: str, dim: int, idx: np.ndarray) -> None:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, attr)
    new = old.detach().index_select(dim, torch.as_tensor(idx, dtype=torch.long)).clone()
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    elif attr in owner._buffers:
        owner._buffers[attr] = new
    else:
        setattr(owner, attr, new)


def _fix_module(mod: nn.Module) -> None:
    """Make a module's size attributes agree with its (sliced) parameters."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        if mod.transposed:
            mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
        elif mod.groups > 1 and mod.groups == mod.in_channels:  # depthwise
            mult = mod.out_channels // mod.in_channels
            mod.out_channels = w.shape[0]
            mod.in_channels = mod.groups = w.shape[0] // mult
        else:
            mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, (nn.modules.batchnorm._NormBase,)):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        if ref is not None:
            mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = mod.weight.numel()


def _rewrite_reshape(node: fx.Node, dim: int, size: int) -> None:
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (tuple, list)):
        shape = list(args[1])
        if isinstance(shape[dim], int) and shape[dim] != -1:
            shape[dim] = size
        args[1] = type(args[1])(shape)
    elif isinstance(kw_shape := node.kwargs.get("shape"), (tuple, list)):
        shape = list(kw_shape)
        if isinstance(shape[dim], int) and shape[dim] != -1:
            shape[dim] = size
        node.kwargs = {**node.kwargs, "shape": tuple(shape)}
    elif isinstance(args[1 + dim], int) and args[1 + dim] != -1:
        args[1 + dim] = size
    node.args = tuple(args)


def _rewrite_select(gm: fx.GraphModule, node: fx.Node, role: Role, positions: np.ndarray) -> None:
    # Read the node's actual input (not the analysed source by name): passes may have put a
    # quantizer between them since the analysis.
    src = node.args[0]
    if isinstance(src, fx.Node) and src.target in _TUPLE_PRODUCERS:
        src = src.args[0]
    name = f"_djpq_select_{node.name}"
    gm.register_buffer(name, torch.as_tensor(positions, dtype=torch.long))
    with gm.graph.inserting_before(node):
        index = gm.graph.get_attr(name)
        new = gm.graph.call_function(torch.index_select, (src, role.dim, index))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


_TUPLE_PRODUCERS = facts.TUPLE_PRODUCERS


def _role_node(nodes: Mapping[str, fx.Node], role: Role) -> fx.Node:
    if role.node not in nodes:
        raise PruningError(
            f"the channel analysis refers to node {role.node!r} ({role.kind} of {role.target!r}), "
            f"which is no longer in the graph (a pass removed it after the analysis); this is a "
            f"compiler bug: please report it with the model, or pass leaf_modules=(...) to keep "
            f"the block around it opaque")
    return nodes[role.node]


def prune_graph(gm: fx.GraphModule, groups: Sequence[ChannelGroup],
                keep: Mapping[int, Sequence[int]]) -> PassResult:
    """Remove every channel not in ``keep[group_id]`` (atoms) from its group's members.

    Raises:
        PruningError: ``keep`` names an unknown group or atom, or empties a member; the graph
            is then unchanged.
    """
    validate_keep(groups, keep)
    slices, reshapes, selects = _collect(groups, keep)
    touched: set[str] = set()
    for (target, dim), idx in slices.items():
        _slice_tensor(gm, target, dim, idx)
        touched.add(target.rpartition(".")[0])
    for path in touched:
        mod = gm.get_submodule(path) if path else gm
        _fix_module(mod)
    nodes = {n.name: n for n in gm.graph.nodes}
    for role, size in reshapes:
        _rewrite_reshape(_role_node(nodes, role), role.dim, size)
    for role, positions in selects:
        _rewrite_select(gm, _role_node(nodes, role), role, positions)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)

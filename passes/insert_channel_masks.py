"""Insert-channel-masks pass: zero removed channels at every gate point (the reference for exact
pruning: ``verify.pruning_oracle`` compares it with ``prune_graph``).

Requires: the channel groups of this graph (see ``dependency/analyze.py``).
Guarantees: after each gate point of every group in ``keep``, the output is multiplied by a 0/1
mask buffer broadcast along the group's channel dimension, so the model computes what the
physically pruned model computes (DESIGN invariant 1). Used by the oracle tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from djpq_compiler.layers import tensor_shape
from djpq_compiler.passes.dependency.groups import ChannelGroup, atom_mask

__all__ = ["insert_channel_masks"]


def _not(new: fx.Node) -> Callable[[fx.Node], bool]:
    return lambda user: user is not new


def insert_channel_masks(gm: fx.GraphModule, groups: Sequence[ChannelGroup],
                         keep: Mapping[int, Sequence[int]]) -> PassResult:
    """Multiply each gate point's output by the kept-channel mask of its group."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for gid, atoms in keep.items():
        group = groups[gid]
        mask = atom_mask(group, atoms)
        for gate in group.gate_points:
            member = group.member(gate)
            node = nodes[gate]
            shape = tensor_shape(node) or ()
            view = [1] * len(shape)
            view[member.dim] = shape[member.dim]
            values = torch.tensor(mask[np.asarray(member.index)], dtype=torch.float32).view(view)
            name = f"_djpq_mask_{gate}"
            gm.register_buffer(name, values)
            with gm.graph.inserting_after(node):
                getter = gm.graph.get_attr(name)
            with gm.graph.inserting_after(getter):
                masked = gm.graph.call_function(torch.mul, (node, getter))
            node.replace_all_uses_with(masked, delete_user_cb=_not(masked))
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)

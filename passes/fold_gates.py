"""Fold-gates pass: replace every VIB gate by its deterministic value and decide what to prune.

Requires: a prepared graph (``gm.djpq_gates``, gate ``call_module`` nodes after gate points) and
its gate paths (``PreparedRecord.gates``: group id -> gate module path).
Guarantees: gate nodes are removed (their users read the gate point directly); the returned
:class:`GateFold` holds ``keep``, each gated group id's kept atoms (``log alpha > log tau``,
rounded up to a multiple of ``config.round_to``; a group, or a member covering part of it
such as a concat branch, that would keep nothing keeps its strongest atom and a warning is
issued);
and ``scales``, each gate-point node name to the per-channel factor ``mu``
(float64, original channel order) that must be folded into that node — exactly what the gate
multiplied in deterministic eval for kept channels (DESIGN invariant 3).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx

from djpq_compiler.modules.gates import VIBGate
from djpq_compiler.passes.pipeline import Recorded

__all__ = ["fold_gates", "GateFold"]


@dataclass(frozen=True)
class GateFold:
    """What ``fold_gates`` decided.

    Attributes:
        keep: ``{group id: kept atoms}`` (sorted) of every gated group.
        scales: ``{gate-point node name: mu}`` per channel (float64, original channel order).
    """

    keep: dict[int, list[int]]
    scales: dict[str, torch.Tensor]


def _keep_atoms(name: str, gate: VIBGate, round_to: int) -> list[int]:
    mask = gate.deploy_mask(round_to)
    for atoms in gate.emptied():
        what = "its group" if len(atoms) == gate.n_atoms else f"the member with atoms {list(atoms)}"
        best = [a for a in atoms if bool(mask[a])][0]
        warnings.warn(f"gate {name} would prune every channel of {what}; keeping channel "
                      f"{best} (the one with the largest alpha)", stacklevel=3)
    return torch.nonzero(mask).flatten().tolist()


def fold_gates(gm: fx.GraphModule, gates: Mapping[int, str], *,
               round_to: int = 1) -> Recorded[GateFold]:
    """Remove gate nodes; return kept atoms per group and ``mu`` per gate point.

    Args:
        gm: A prepared graph (a copy: it is changed in place).
        gates: ``{group id: gate module path}`` (``PreparedRecord.gates``).
        round_to: Kept channels per group are rounded up to a multiple of this
            (``DJPQConfig.round_to``).
    """
    keep: dict[int, list[int]] = {}
    scales: dict[str, torch.Tensor] = {}
    paths = gates
    by_path = {path: gid for gid, path in paths.items()}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or str(node.target) not in by_path:
            continue
        gid = by_path[str(node.target)]
        gate = gm.get_submodule(str(node.target))
        if not isinstance(gate, VIBGate):
            continue
        if gid not in keep:
            keep[gid] = _keep_atoms(str(node.target), gate, round_to)
        source, index = node.args[0], node.args[1] if len(node.args) > 1 else None
        mu = gate.mu.detach().to(torch.float64)
        if isinstance(index, fx.Node):
            mu = mu[getattr(gm, str(index.target)).long()]
        scales[source.name] = mu
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    if hasattr(gm, "djpq_gates"):
        delattr(gm, "djpq_gates")
    gm.graph.lint()
    gm.recompile()
    return Recorded(gm, GateFold(keep, scales), bool(keep))

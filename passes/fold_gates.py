"""Fold-gates pass: replace every VIB gate by its deterministic value and decide what to prune.

Requires: a prepared graph (``gm.djpq_gates``, gate ``call_module`` nodes after gate points,
``gm.meta["djpq.groups"]``).
Guarantees: gate nodes are removed (their users read the gate point directly);
``gm.meta["djpq.keep"]`` maps each gated group id to its kept atoms (``log alpha > log tau``,
rounded up to a multiple of ``config.round_to``; a group, or a member covering part of it
such as a concat branch, that would keep nothing keeps its strongest atom and a warning is
issued);
``gm.meta["djpq.gate_scales"]`` maps each gate-point node name to the per-channel factor ``mu``
(float64, original channel order) that must be folded into that node — exactly what the gate
multiplied in deterministic eval for kept channels (DESIGN invariant 3).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from djpq_compiler.modules.gates import VIBGate

__all__ = ["fold_gates"]


def _keep_atoms(name: str, gate: VIBGate, round_to: int) -> list[int]:
    mask = gate.deploy_mask(round_to)
    for atoms in gate.emptied():
        what = "its group" if len(atoms) == gate.n_atoms else f"the member with atoms {list(atoms)}"
        best = [a for a in atoms if bool(mask[a])][0]
        warnings.warn(f"gate {name} would prune every channel of {what}; keeping channel "
                      f"{best} (the one with the largest alpha)", stacklevel=3)
    return torch.nonzero(mask).flatten().tolist()


def fold_gates(gm: fx.GraphModule) -> PassResult:
    """Remove gate nodes, recording kept atoms per group and ``mu`` per gate point."""
    keep: dict[int, list[int]] = {}
    round_to = int(getattr(gm.meta.get("djpq.config"), "round_to", 1))
    scales: dict[str, torch.Tensor] = {}
    paths: dict[int, str] = gm.meta.get("djpq.gates", {})
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
    gm.meta["djpq.keep"] = keep
    gm.meta["djpq.gate_scales"] = scales
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(keep))

"""Verification helpers users can run on their own models.

The pruning oracle: for random kept-channel sets, a model whose removed channels are zeroed at the
gate points (masking) must compute exactly what the physically pruned model computes.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import numpy as np
import torch

from djpq_compiler.analysis import AnalysisReport, analyze
from djpq_compiler.passes.capture import as_input_tuple, propagate_shapes
from djpq_compiler.passes.dependency.groups import atom_mask
from djpq_compiler.passes.insert_channel_masks import insert_channel_masks
from djpq_compiler.passes.prune import prune_graph
from djpq_compiler.records import converted_record, prepared_record

__all__ = ["random_keep", "pruning_oracle", "integer_agreement"]


def random_keep(report: AnalysisReport, seed: int = 0) -> dict[int, list[int]]:
    """Keep 30-70 % of every prunable group (at least one channel of every member)."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in report.prunable_groups:
        n = max(1, int(round(g.size * rng.uniform(0.3, 0.7))))
        kept = set(rng.choice(g.size, size=n, replace=False).tolist())
        for member in g.members:  # no member (concat branch, split piece) may become empty
            if member.index and not kept.intersection(member.index):
                kept.add(int(rng.choice(np.asarray(member.index))))
        keep[g.id] = sorted(kept)
    return keep


def _first_tensor(out: Any) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out["out"] if isinstance(out, dict) else out[0]
    return out


def pruning_oracle(model: torch.nn.Module, example: Any, seed: int = 0
               ) -> tuple[AnalysisReport, float, int, int]:
    """Returns (report, relative max error, params before, params after)."""
    report = analyze(model, example)
    keep = random_keep(report, seed)
    masked = copy.deepcopy(report.graph_module)
    insert_channel_masks(masked, report.groups, keep)
    pruned = copy.deepcopy(report.graph_module)
    prune_graph(pruned, report.groups, keep)
    inputs = as_input_tuple(example)
    propagate_shapes(pruned, inputs)
    with torch.no_grad():
        a = _first_tensor(masked.eval()(*inputs))
        b = _first_tensor(pruned.eval()(*inputs))
    err = (a - b).abs().max().item() / (a.abs().max().item() + 1e-12)
    n0 = sum(p.numel() for p in report.graph_module.parameters())
    n1 = sum(p.numel() for p in pruned.parameters())
    return report, err, n0, n1


def _node_values(gm: torch.fx.GraphModule, inputs: tuple[Any, ...], names: set[str],
                 forced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Run ``gm`` and keep the outputs of the named nodes; a node in ``forced`` is recorded,
    then its output is replaced by the forced value (so later ops see the reference input)."""
    seen: dict[str, torch.Tensor] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in names:  # clone: a later in-place op (ReLU(inplace=True)) may edit it
                seen[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
            if forced is not None and n.name in forced:
                return forced[n.name].clone()
            return out

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    return seen


def integer_agreement(prepared: torch.fx.GraphModule, converted: torch.fx.GraphModule,
                      example: Any, *, per_op: bool = True) -> dict[str, int]:
    """Max code difference (in LSB) between the fake-quant prepared model (eval, hard gates,
    quantizers snapped to their read-out bits) and the integer converted model at every
    activation quantizer.

    With ``per_op`` (default) each integer op is fed the fake-quant model's codes of its
    inputs, so the number is that op's own error (DESIGN invariant 4: at most 1 LSB); with
    ``per_op=False`` the integer model runs on its own, and 1-LSB differences may compound
    through depth.
    """
    from djpq_compiler.prepared import set_gates_deterministic, snap_quantizers

    inputs = as_input_tuple(example)
    mapping = converted_record(converted).quant_map
    model = _copy_for_readout(prepared).eval()
    set_gates_deterministic(model, True)
    snap_quantizers(model)  # the deployed grid (read-out bits) is the reference
    fq = _node_values(model, inputs, set(mapping))
    nodes = {n.name: n for n in model.graph.nodes}
    reference = {}
    for qname, cname in mapping.items():
        d = float(cast(Any, model.get_submodule(str(nodes[qname].target))).snapped().d)
        codes = torch.round(fq[qname].to(torch.float64) / d).to(torch.int64)
        reference[cname] = _kept_part(model, converted_record(converted).keep, nodes[qname],
                                      codes)
    ints = _node_values(converted, inputs, set(mapping.values()),
                        forced=reference if per_op else None)
    return {q: int((reference[c] - ints[c]).abs().max()) for q, c in mapping.items()}


def _copy_for_readout(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``prepared`` whose gates and quantizers are its own (they are changed on
    it) while every other parameter and buffer (the weights) is shared with ``prepared``: an eval
    forward never writes them, and a second copy of a large model's weights (2.5 GB for
    vit_h_14) is what made the agreement check run out of memory."""
    from djpq_compiler.prepared import gates, quantizers

    own = {id(t) for _, m in (*quantizers(prepared), *gates(prepared))
           for t in (*m.parameters(), *m.buffers())}
    shared = {id(t): t for t in (*prepared.parameters(), *prepared.buffers()) if id(t) not in own}
    return copy.deepcopy(prepared, shared)


def _kept_part(model: torch.fx.GraphModule, keep: dict[int, list[int]], qnode: torch.fx.Node,
               codes: torch.Tensor) -> torch.Tensor:
    """The channels of a prepared-model value that survive pruning (others are zero there)."""
    by_node = {m.node: (g, m) for g in prepared_record(model).groups for m in g.members}
    src = qnode.args[0]
    while isinstance(src, torch.fx.Node) and src.name not in by_node and src.op == "call_module":
        src = src.args[0]  # through gates and quantizers inserted after the analysis
    hit = by_node.get(src.name) if isinstance(src, torch.fx.Node) else None
    if hit is None or hit[0].id not in keep:
        return codes
    group, member = hit
    elems = np.nonzero(atom_mask(group, keep[group.id])[np.asarray(member.index)])[0]
    return codes.index_select(member.dim, torch.as_tensor(elems, dtype=torch.long))

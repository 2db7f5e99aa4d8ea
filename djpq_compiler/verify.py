"""Verification helpers users can run on their own models.

The pruning oracle: for random kept-channel sets, a model whose removed channels are zeroed at the
gate points (masking) must compute exactly what the physically pruned model computes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from djpq_compiler.analysis import AnalysisReport, analyze
from djpq_compiler.passes.capture import as_input_tuple, propagate_shapes
from djpq_compiler.passes.mask import insert_channel_masks
from djpq_compiler.passes.prune import prune_graph

__all__ = ["random_keep", "pruning_oracle"]


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
    masked.meta["djpq.groups"] = report.groups
    insert_channel_masks(masked, keep)
    pruned = copy.deepcopy(report.graph_module)
    pruned.meta["djpq.groups"] = report.groups
    prune_graph(pruned, keep)
    inputs = as_input_tuple(example)
    propagate_shapes(pruned, inputs)
    with torch.no_grad():
        a = _first_tensor(masked.eval()(*inputs))
        b = _first_tensor(pruned.eval()(*inputs))
    err = (a - b).abs().max().item() / (a.abs().max().item() + 1e-12)
    n0 = sum(p.numel() for p in report.graph_module.parameters())
    n1 = sum(p.numel() for p in pruned.parameters())
    return report, err, n0, n1

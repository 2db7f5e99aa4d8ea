"""The properties every generated network must satisfy (shared by tests and the long fuzz run).

Each ``check_*`` function builds the network of a :class:`~djpq_compiler.testing.graphs.Recipe`,
runs one part of the compiler on it and raises :class:`PropertyViolation` (an
``AssertionError``) naming the recipe when a property does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from djpq_compiler.analysis import analyze
from djpq_compiler.bops import bops
from djpq_compiler.prepare import prepare
from djpq_compiler.prepared import open_gates, set_quantizers
from djpq_compiler.testing.graphs import Recipe, build, example_input
from djpq_compiler.verify import pruning_oracle

__all__ = ["PropertyViolation", "OracleStats", "check_analysis", "check_prepare", "NO_RULE_TARGETS",
           "ORACLE_TOLERANCE"]

#: Targets of the generator's ops that have no channel rule (they must be barriers).
NO_RULE_TARGETS: tuple[object, ...] = (torch.cumsum, torch.flip, "roll")
ORACLE_TOLERANCE = 1e-4


class PropertyViolation(AssertionError):
    """A generated network broke a property; the message starts with the recipe."""


@dataclass(frozen=True)
class OracleStats:
    """What one :func:`check_analysis` run saw."""

    groups: int
    prunable: int
    missing: int
    rel_err: float
    params_before: int
    params_after: int


def _fail(recipe: Recipe, what: str) -> PropertyViolation:
    return PropertyViolation(f"{recipe!r}\n  {what}")


def check_analysis(recipe: Recipe, seed: int | None = None) -> OracleStats:
    """``analyze`` works (strict=False), the pruning oracle is exact, parameters never grow and
    every group touching an op with no rule is not prunable.

    ``seed`` picks the kept channels (default: ``recipe.seed``, so a failure replays exactly).
    """
    seed = recipe.seed if seed is None else seed
    model, x = build(recipe), example_input(recipe)
    report = analyze(model, x)
    gm = report.graph_module
    no_rule = {n.name for n in gm.graph.nodes
               if n.op in ("call_function", "call_method") and n.target in NO_RULE_TARGETS}
    if not no_rule <= set(report.missing):
        raise _fail(recipe, f"ops with no rule {sorted(no_rule - set(report.missing))} were "
                            f"not reported missing: {report.missing}")
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in report.missing:
        touched = {a.name for a in nodes[name].all_input_nodes} | {name}
        for g in report.prunable_groups:
            if g.nodes & touched:
                raise _fail(recipe, f"group {g.id} touches {name} (no rule) but is prunable")
    _, err, n0, n1 = pruning_oracle(model, x, seed)
    if not err < ORACLE_TOLERANCE:
        raise _fail(recipe, f"masked vs pruned relative error {err:.3g} (seed {seed})\n"
                            f"{report.summary()}")
    if n1 > n0:
        raise _fail(recipe, f"pruning grew the parameter count {n0} -> {n1}")
    return OracleStats(len(report.groups), len(report.prunable_groups), len(report.missing),
                       err, n0, n1)


def _rows(report: object) -> list[tuple[object, ...]]:
    return [(r.name, r.in_kept, r.out_kept, r.b_w, r.b_a, r.bops)
            for r in report.rows]  # type: ignore[attr-defined]


def check_prepare(recipe: Recipe) -> None:
    """``prepare`` with quantizers off and gates exactly open equals the model, and
    ``bops(prepared)`` (8-bit default, network input at ``input_bits=8``) equals
    ``bops(model, weight_bits=8, act_bits=8)`` row by row."""
    model, x = build(recipe), example_input(recipe)
    torch.manual_seed(0)
    gm = prepare(model, x).eval()
    rows, expected = _rows(bops(gm)), _rows(bops(model, x, weight_bits=8, act_bits=8))
    if rows != expected:
        diff = [(a, b) for a, b in zip(rows, expected, strict=False) if a != b]
        raise _fail(recipe, f"bops(prepared) != bops(model, 8, 8): {diff[:3]}")
    set_quantizers(gm, enabled=False)
    open_gates(gm)
    with torch.no_grad():
        got, want = gm(x), model(x)
    if not torch.equal(got, want):
        err = (got - want).abs().max().item()
        raise _fail(recipe, f"prepared (quantizers off, gates open) differs by {err:.3g}")

"""Public channel-group API: ``analyze`` (what can be pruned together) and ``prune``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from djpq_compiler.errors import PruningError
from djpq_compiler.layers import find_layers
from djpq_compiler.passes.capture import as_input_tuple, capture, propagate_shapes
from djpq_compiler.passes.dependency import ChannelGroup, dependency_analysis
from djpq_compiler.passes.prune import prune_graph, validate_keep

__all__ = ["AnalysisReport", "analyze", "prune"]


@dataclass(frozen=True)
class AnalysisReport:
    """Channel groups of a model.

    Attributes:
        graph_module: The captured graph the groups refer to (node names are its names).
        groups: Every channel group (prunable or not).
        barriers: ``{node name: reasons}`` for nodes that stop pruning.
        missing: Nodes whose op has no channel rule (treated as barriers).
    """

    graph_module: fx.GraphModule
    groups: tuple[ChannelGroup, ...]
    barriers: Mapping[str, tuple[str, ...]]
    missing: tuple[str, ...]

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def group_of(self, node: str) -> ChannelGroup:
        """The group whose members include ``node``'s output channels."""
        for g in self.groups:
            if node in g.nodes:
                return g
        raise KeyError(f"{node!r} has no tracked channels")

    @property
    def prunable_fraction(self) -> float:
        """Fraction of conv/linear output channels that lie in prunable groups."""
        prunable = {n for g in self.prunable_groups for n in g.producers}
        layers = find_layers(self.graph_module)
        total = sum(layer.out_channels for layer in layers)
        kept = sum(layer.out_channels for layer in layers if layer.node.name in prunable)
        return kept / total if total else 0.0

    def summary(self) -> str:
        lines = [f"{len(self.groups)} channel groups, {len(self.prunable_groups)} prunable; "
                 f"{100 * self.prunable_fraction:.1f}% of conv/linear output channels prunable"]
        for g in self.groups:
            status = "prunable" if g.prunable else f"fixed: {g.reason}"
            lines.append(f"  group {g.id:>3}  {g.size:>5} ch  producers={list(g.producers)[:4]}"
                         f"  {status}")
        if self.missing:
            lines.append(f"ops with no channel rule (barriers): {list(self.missing)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def analyze(model: nn.Module, example_inputs: Any, *, strict: bool = False,
            ignore: Iterable[str] = (), leaf_modules: Sequence[type[nn.Module]] = (),
            concrete_args: dict[str, Any] | None = None) -> AnalysisReport:
    """Find the channel groups of ``model``.

    Args:
        model: Any traceable ``nn.Module`` (not modified).
        example_inputs: A tensor or tuple of forward arguments.
        strict: Raise :class:`~djpq_compiler.errors.UnsupportedOpError` on the first op with no
            channel rule instead of treating it as a barrier.
        ignore: Module names (or node names) whose channels must never be pruned.
        leaf_modules: Module classes kept opaque by the tracer (their forward is not traced:
            e.g. a block with data-dependent control flow); their channels are barriers.
        concrete_args: Forward arguments fixed at trace time (``torch.fx`` ``concrete_args``),
            e.g. ``{"return_features": False}`` to decide a Python branch.
    """
    gm = capture(model, example_inputs, leaf_modules=tuple(leaf_modules),
                 concrete_args=concrete_args).graph_module
    record = dependency_analysis(gm, strict=strict, ignore=ignore).record
    return AnalysisReport(gm, record.groups, record.barriers, record.missing)


def prune(model: nn.Module, example_inputs: Any,
          keep: Mapping[int, Sequence[int]], *, leaf_modules: Sequence[type[nn.Module]] = (),
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """A physically smaller copy of ``model`` keeping ``keep[group_id]`` channels of each group.

    Group ids and channel indices are those of ``analyze(model, example_inputs)``; groups not in
    ``keep`` are left whole. The input model is never modified.

    Raises:
        PruningError: a group id is unknown or not prunable, indices are invalid or empty, or
            the pruned graph fails to run on ``example_inputs``.
    """
    report = analyze(model, example_inputs, leaf_modules=leaf_modules,
                     concrete_args=concrete_args)
    validate_keep(report.groups, keep)
    gm = report.graph_module
    prune_graph(gm, report.groups, keep)
    try:
        propagate_shapes(gm, as_input_tuple(example_inputs))
    except Exception as exc:  # a bug in a rule, not the user's fault: say so plainly
        raise PruningError(f"the pruned graph no longer runs on the example inputs: {exc}. "
                           "This is a bug in a channel rule; please report it with the model."
                           ) from exc
    return gm

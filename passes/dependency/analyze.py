"""The dependency-analysis pass: run every node's channel rule, then freeze the groups.

Requires: a captured ``GraphModule`` (``tensor_meta`` on tensor nodes, see ``capture.py``).
Guarantees: the returned :class:`~djpq_compiler.records.AnalysisRecord` holds the frozen
``ChannelGroup`` tuple and maps node names to the reasons they stop pruning; the graph itself is
not modified. Unknown ops are barriers (or raise ``UnsupportedOpError`` when ``strict``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from djpq_compiler.errors import UnsupportedOpError
from djpq_compiler.layers import tensor_shape
from djpq_compiler.passes.dependency.groups import build_groups
from djpq_compiler.passes.dependency.rules import RULES
from djpq_compiler.passes.dependency.state import AnalysisState, Info, Opaque, Space
from djpq_compiler.passes.pipeline import Recorded
from djpq_compiler.records import AnalysisRecord
from djpq_compiler.registry import node_key

__all__ = ["DependencyResult", "dependency_analysis", "analyze_graph"]


#: The analysis result is the record ``prepare`` hands on (old name kept for callers).
DependencyResult = AnalysisRecord


def _is_tensor_op(node: fx.Node) -> bool:
    """Whether the node touches tensors (pure Python arithmetic on sizes does not)."""
    if tensor_shape(node) is not None:
        return True
    return any(tensor_shape(a) is not None for a in node.all_input_nodes)


def _unknown(st: AnalysisState, node: fx.Node, missing: list[str]) -> Info:
    key = node_key(st.gm, node)
    label = getattr(key, "__name__", str(key))
    if st.strict:
        raise UnsupportedOpError(
            f"no channel rule for {node.format_node()} (op {label}). Register one with "
            f"djpq_compiler.passes.dependency.rules.RULES.register({label}) or call with "
            f"strict=False to treat it as a barrier."
        )
    missing.append(node.name)
    for arg in node.all_input_nodes:
        st.barrier_info(st.info.get(arg.name), f"input of {node.name} ({label}), an op with no "
                                                "channel rule")
    return Opaque(f"output of {node.name} ({label})")


def _run_rules(st: AnalysisState) -> list[str]:
    missing: list[str] = []
    for node in st.gm.graph.nodes:
        if node.op == "placeholder":
            st.info[node.name] = Opaque("network input")
        elif node.op == "get_attr":
            continue  # a parameter gets a space when broadcast against tracked channels
        elif node.op == "output":
            for arg in node.all_input_nodes:
                st.barrier_info(st.info.get(arg.name), "network output")
        elif not _is_tensor_op(node):
            st.info[node.name] = None
        else:
            rule = RULES.lookup(st.gm, node)
            st.info[node.name] = rule(st, node) if rule else _unknown(st, node, missing)
    return missing


def _union_module_calls(st: AnalysisState) -> None:
    """A module called several times keeps one channel set per side: join its calls' spaces."""
    for calls in st.module_calls.values():
        for (x0, y0), (x1, y1) in zip(calls, calls[1:], strict=False):
            for a, b in ((x0, x1), (y0, y1)):
                if isinstance(a, Space) and isinstance(b, Space):
                    st.union(a, b)
                elif isinstance(a, Space) != isinstance(b, Space):
                    for s in (a, b):
                        if isinstance(s, Space):
                            st.barrier(s, "module called on tracked and untracked channels")


def analyze_graph(gm: fx.GraphModule, *, strict: bool = False,
                  ignore: Iterable[str] = ()) -> DependencyResult:
    """Channel groups of a captured graph (pure: the graph is not modified)."""
    st = AnalysisState(gm, strict=strict)
    missing = _run_rules(st)
    _union_module_calls(st)
    ignored = set(ignore)
    targets = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for space in st.spaces:
        if space.node in ignored or targets.get(space.node) in ignored:
            st.barrier(space, f"{space.node} is in the ignored layers")
    groups = build_groups(st)
    barriers: dict[str, list[str]] = {}
    for sid, reasons in st.barriers.items():
        barriers.setdefault(st.spaces[sid].node, []).extend(reasons)
    return DependencyResult(groups, {k: tuple(dict.fromkeys(v)) for k, v in barriers.items()},
                            tuple(missing))


def dependency_analysis(gm: fx.GraphModule, *, strict: bool = False,
                        ignore: Iterable[str] = ()) -> Recorded[AnalysisRecord]:
    """Pass form of :func:`analyze_graph`: the graph, unchanged, and its analysis record."""
    return Recorded(gm, analyze_graph(gm, strict=strict, ignore=ignore), modified=False)

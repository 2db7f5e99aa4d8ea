"""What every backend shares: the converter registry type, the lowering-context base, the walk
over the graph and the one report of the nodes a backend cannot lower.

A backend (``backends/tvm``, ``backends/onnx``, any later one) creates one
:class:`~djpq_compiler.registry.Registry` of converters (``(ctx, node) -> value``), keyed like
every registry of this project (the IR module class of ``djpq_compiler.ir.modules`` or a float
``nn`` module class, the ``call_function`` target, the ``torch.Tensor`` method, or the node op
``"placeholder"``/``"get_attr"``/``"output"``), and subclasses :class:`LoweringContext` for its
state. :func:`lower_nodes` then runs the converters in graph order and raises one
:class:`~djpq_compiler.errors.UnsupportedNodesError` naming every node that has no converter or
whose converter refused it, before anything is built or written.

Constant subgraphs (calls whose every input is a ``get_attr`` tensor or another such call, e.g.
Swin V2's continuous position-bias MLP on its coordinate table) are evaluated once by the
reference executor itself (:func:`constant_subgraphs`) when the backend registers a converter
under ``"constant"``: each float tensor (or ``Quantize`` output) where such a subgraph meets the
rest of the graph is handed to that converter (``ctx.folded[node]``) and the subgraph is not
lowered, so the backend gets exactly the reference's values and nothing is recomputed per call.
A backend that also registers ``"constant_codes"`` gets every integer boundary folded too (the
codes of any integer op, range read from the values): TVM does, since an integer op left on
constant inputs would reach its FoldConstant pass, which compiles a written x86 kernel for a
generic CPU and aborts the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import fx

from djpq_compiler.errors import BackendError, UnsupportedNodesError
from djpq_compiler.registry import CALL_OPS, GRAPH_OPS, Registry

__all__ = [
    "LoweringContext",
    "Poison",
    "call_arg",
    "constant_subgraphs",
    "describe_op",
    "index_or_slice",
    "lower_nodes",
    "raise_unsupported",
    "unsupported_nodes",
]


class Poison:
    """Marks a node whose lowering failed; its consumers are skipped, not reported again."""


def call_arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """The raw ``index``-th positional argument of ``node``, else keyword ``name``, else
    ``default`` (fx nodes are returned as nodes)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class LoweringContext:
    """State every lowering has: the graph, the value of every lowered node, and the helpers
    that read a node's module and arguments.

    Subclasses set :attr:`INT_TYPES` (the value types holding integer codes) and add the
    backend's builder and emitting helpers.
    """

    #: Value types that hold integer codes (what :meth:`int_arg` accepts).
    INT_TYPES: ClassVar[tuple[type, ...]] = ()

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.env: dict[fx.Node, Any] = {}
        #: Float tensors of folded constant subgraphs, by boundary node (see lower_nodes).
        self.folded: dict[fx.Node, torch.Tensor] = {}

    def module(self, node: fx.Node) -> Any:
        """The submodule a ``call_module`` node calls (typed loosely: converters know its class)."""
        return self.gm.get_submodule(str(node.target))

    def value(self, arg: Any) -> Any:
        """Map fx nodes inside ``arg`` (possibly nested) to their lowered values."""
        return fx.node.map_arg(arg, lambda n: self.env[n])

    def arg(self, node: fx.Node, index: int, name: str, default: Any) -> Any:
        """The lowered value of the ``index``-th positional argument, else of keyword ``name``,
        else ``default``."""
        return self.value(call_arg(node, index, name, default))

    def int_arg(self, node: fx.Node, index: int = 0) -> Any:
        """The ``index``-th positional argument of ``node`` as integer codes."""
        value = self.value(node.args[index])
        if not isinstance(value, self.INT_TYPES):
            raise BackendError(
                f"{node.format_node()}: expects integer codes as input {index}, got "
                f"{type(value).__name__}; a Quantize must precede integer ops"
            )
        return value


def index_or_slice(ctx: LoweringContext, node: fx.Node,
                   slice_tensor: Callable[[Any, fx.Node, Any, Any], Any]) -> Any:
    """``operator.getitem``: an item of a lowered tuple or list (a piece of a split, a size), or
    a tensor indexed by the backend's ``slice_tensor(ctx, node, value, index)``."""
    container, index = ctx.value(node.args[0]), ctx.value(node.args[1])
    if isinstance(container, (tuple, list)):
        return container[index]
    return slice_tensor(ctx, node, container, index)


# ------------------------------------------------------------------------------ the report


def describe_op(gm: fx.GraphModule, node: fx.Node) -> str:
    """The op a node calls, for messages: ``module IntConv2d``, ``call_function <erf>``."""
    if node.op == "call_module":
        return f"module {type(gm.get_submodule(str(node.target))).__name__}"
    return f"{node.op} {node.target!r}"


def _is_float_producer(gm: fx.GraphModule, node: fx.Node, floaty: set[fx.Node]) -> bool:
    """Whether ``node`` yields a float tensor (graph input, Dequantize, float-out layer, island)."""
    from djpq_compiler.ir.modules import Dequantize, Quantize

    if node.op == "placeholder":
        return True
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, Dequantize) or getattr(module, "out_scale", 0) is None:
            return True
        if isinstance(module, Quantize):
            return False
    return any(arg in floaty for arg in node.all_input_nodes)


def unsupported_nodes(gm: fx.GraphModule, registry: Registry[Any],
                      backend: str) -> list[tuple[fx.Node, str]]:
    """Every node ``registry`` has no converter for, with the reason, in graph order.

    The reason names the op and says when it is a float op between a ``Dequantize`` and a
    ``Quantize`` (a float island), so the user knows which side of the integer graph it is on.
    """
    missing = set(registry.missing(gm, ops=GRAPH_OPS))
    floaty: set[fx.Node] = set()
    report: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        if _is_float_producer(gm, node, floaty):
            floaty.add(node)
        if node in missing:
            in_island = any(a in floaty for a in node.all_input_nodes)
            where = " (a float op between Dequantize and Quantize)" if in_island else ""
            report.append((node, f"no {backend} converter for {describe_op(gm, node)}{where}"))
    return report


def raise_unsupported(backend: str, package: str, report: list[tuple[fx.Node, str]],
                      note: str = "") -> None:
    """Raise one :class:`UnsupportedNodesError` listing every ``(node, reason)`` of ``report``.

    Args:
        backend: The backend's name in the message (``"TVM"``).
        package: Where its ``register`` lives (``"djpq_compiler.backends.tvm"``).
        report: The nodes and why each cannot be lowered (no-op when empty).
        note: A sentence appended to the message (e.g. ``"Nothing was written."``).
    """
    if not report:
        return
    lines = "\n".join(f"  {n.format_node()}  # {why}" for n, why in report)
    raise UnsupportedNodesError(
        f"the {backend} backend cannot lower {len(report)} node(s):\n{lines}\n"
        "Keep these ops in PyTorch (run the converted model there), replace them with "
        "supported ops before convert(), fix the reason given, or add a converter with "
        f"{package}.register(<target>).{' ' + note if note else ''}"
    )


def _constant_values(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Every call whose inputs are all ``get_attr`` tensors or such calls, run by the reference
    executor (``torch.fx.Interpreter`` on the converted model), with its value."""
    interpreter = fx.Interpreter(gm)
    values: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            values[node] = interpreter.run_node(node)
        elif node.op in CALL_OPS and inputs and all(n in values for n in inputs):
            interpreter.env = dict(values)
            values[node] = interpreter.run_node(node)
    return {n: v for n, v in values.items() if n.op != "get_attr"}


def _foldable(gm: fx.GraphModule, node: fx.Node, value: Any, codes: bool) -> bool:
    """A float tensor, or the integer codes of a ``Quantize`` (whose scale and range the backend
    reads from the module), or with ``codes`` any non-empty integer tensor."""
    from djpq_compiler.ir.modules import Quantize

    if not torch.is_tensor(value):
        return False
    if value.is_floating_point():
        return True
    if codes and value.dtype != torch.bool and value.numel():
        return True
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), Quantize)


def constant_subgraphs(gm: fx.GraphModule, codes: bool = False
                       ) -> tuple[dict[fx.Node, torch.Tensor], set[fx.Node]]:
    """``(folded, skipped)``: the boundaries of constant subgraphs with their reference values,
    and the constant calls that then need no lowering.

    A constant call is *folded* when a non-constant node (or the output) uses it and its value
    is a float tensor or a ``Quantize``'s codes (with ``codes=True``: any integer tensor);
    constant calls only folded nodes depend on are *skipped*. Anything else (non-tensor
    boundaries, other integer ones without ``codes``) is lowered as usual. Evaluation errors
    fold nothing.
    """
    try:
        with torch.no_grad():
            values = _constant_values(gm)
    except Exception:  # the converters then lower (or refuse) these nodes as usual
        return {}, set()
    folded = {n: v for n, v in values.items()
              if _foldable(gm, n, v, codes) and any(u not in values for u in n.users)}
    needed: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node in values and node not in needed:
            continue
        for source in node.all_input_nodes:
            if source in values and source not in folded:
                needed.add(source)
    return folded, {n for n in values if n not in folded and n not in needed}


def lower_nodes(ctx: LoweringContext, registry: Registry[Any], backend: str, package: str,
                note: str = "") -> None:
    """Lower every node of ``ctx.gm`` into ``ctx.env`` with its converter, in graph order.

    A node without a converter, or whose converter refuses it (a
    :class:`~djpq_compiler.errors.BackendError`), is poisoned: its consumers are skipped (their
    problem is their input) and the walk goes on, so one error lists every problem.

    Raises:
        UnsupportedNodesError: Listing every node that could not be lowered, and why.
    """
    gm = ctx.gm
    missing = dict(unsupported_nodes(gm, registry, backend))
    report: list[tuple[fx.Node, str]] = []
    constant = registry.get("constant")
    skipped: set[fx.Node] = set()
    if constant is not None:
        ctx.folded, skipped = constant_subgraphs(gm, codes="constant_codes" in registry)
    for node in gm.graph.nodes:
        if node in skipped:
            continue  # only folded constants use it
        converter = constant if node in ctx.folded else registry.lookup(gm, node)
        if converter is None:
            report.append((node, missing.get(node, f"no {backend} converter")))
            ctx.env[node] = Poison()
            continue
        if any(isinstance(ctx.env.get(a), Poison) for a in node.all_input_nodes):
            ctx.env[node] = Poison()  # its input already failed and is reported
            continue
        try:
            ctx.env[node] = converter(ctx, node)
        except BackendError as exc:
            report.append((node, str(exc)))
            ctx.env[node] = Poison()
    raise_unsupported(backend, package, report, note)

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import fx

from djpq_compiler.errors import BackendError, UnsupportedNodesError
from djpq_compiler.registry import GRAPH_OPS, Registry

__all__ = [
    "LoweringContext",
    "Poison",
    "call_arg",
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
    for node in gm.graph.nodes:
        converter = registry.lookup(gm, node)
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

"""Lower a converted GraphModule to a Relax IRModule: converter registry and lowering driver.

A converted graph (``gm.meta["djpq.stage"] == "converted"``) holds the integer modules of
``djpq_compiler.ir.modules`` plus shape ops. Each node is lowered by one
converter, looked up by the *target object*: the module class for ``call_module`` nodes, the
function for ``call_function`` nodes and the ``torch.Tensor`` method for ``call_method`` nodes.
Every converter has the signature ``(ctx: Lowering, node: Node) -> Lowered``.

Values flowing between converters carry their integer range, from which the container dtype is
chosen (uint8/int8 for 8 bits and below, uint16/int16, int32, int64): a sub-8-bit code lives in an
8-bit container (TVM's ``int4`` is broken, REFERENCE.md §3).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import fx

from djpq_compiler import records
from djpq_compiler.errors import BackendError

from .adapter import Builder

__all__ = [
    "FloatValue",
    "IntValue",
    "Lowered",
    "Lowering",
    "container_dtype",
    "converter_for",
    "lower",
    "register",
    "unsupported_nodes",
]


@dataclass(frozen=True)
class IntValue:
    """Integer codes in a narrow container; every element lies in ``[lo, hi]``."""

    expr: Any
    lo: int
    hi: int


@dataclass(frozen=True)
class FloatValue:
    """A float32 tensor (the network input, a Dequantize or a float-output layer)."""

    expr: Any


#: What a converter returns: a tensor value, or a plain Python value (shape ints, tuples).
Lowered = IntValue | FloatValue | int | float | tuple | list | None
Converter = Callable[["Lowering", fx.Node], Lowered]
_F = TypeVar("_F", bound=Converter)

_REGISTRY: dict[object, Converter] = {}

_CONTAINERS = (
    ("uint8", 0, 2**8 - 1), ("int8", -(2**7), 2**7 - 1),
    ("uint16", 0, 2**16 - 1), ("int16", -(2**15), 2**15 - 1),
    ("int32", -(2**31), 2**31 - 1), ("int64", -(2**63), 2**63 - 1),
)


def container_dtype(lo: int, hi: int) -> str:
    """The narrowest container dtype holding every integer in ``[lo, hi]``."""
    for name, cmin, cmax in _CONTAINERS:
        if cmin <= lo and hi <= cmax:
            return name
    raise BackendError(f"integer range [{lo}, {hi}] does not fit int64")


def register(*targets: object) -> Callable[[_F], _F]:
    """Register a converter for module classes, functions or ``torch.Tensor`` methods."""

    def decorate(fn: _F) -> _F:
        for target in targets:
            _REGISTRY[target] = fn
        return fn

    return decorate


def _key(gm: fx.GraphModule, node: fx.Node) -> object | None:
    """The registry key of a node: module class, function, or ``torch.Tensor`` method."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return getattr(torch.Tensor, str(node.target), None)
    return None


def converter_for(gm: fx.GraphModule, node: fx.Node) -> Converter | None:
    """The converter of ``node``, or ``None`` if the backend cannot lower it."""
    if node.op in ("placeholder", "output", "get_attr"):
        return _REGISTRY.get(node.op)
    key = _key(gm, node)
    return _REGISTRY.get(key) if key is not None else None


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


def _describe(gm: fx.GraphModule, node: fx.Node, in_island: bool) -> str:
    """Why ``node`` cannot be lowered: the op it calls, and whether it sits in a float island."""
    if node.op == "call_module":
        what = f"module {type(gm.get_submodule(str(node.target))).__name__}"
    else:
        what = f"{node.op} {node.target!r}"
    where = " (a float op between Dequantize and Quantize)" if in_island else ""
    return f"no TVM converter for {what}{where}"


def unsupported_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Every node the backend cannot lower, with the reason, in graph order."""
    floaty: set[fx.Node] = set()
    missing: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        if _is_float_producer(gm, node, floaty):
            floaty.add(node)
        if converter_for(gm, node) is not None:
            continue
        in_island = any(a in floaty for a in node.all_input_nodes)
        missing.append((node, _describe(gm, node, in_island)))
    return missing


def check_supported(gm: fx.GraphModule) -> None:
    """Raise one :class:`BackendError` listing every unsupported node of ``gm``."""
    if records.stage(gm) != "converted":
        raise BackendError(
            "the TVM backend lowers converted models only (stage 'converted', got "
            f"{records.stage(gm)!r}); run djpq_compiler.convert() first"
        )
    missing = unsupported_nodes(gm)
    if missing:
        lines = "\n".join(f"  {n.format_node()}  # {why}" for n, why in missing)
        raise BackendError(
            f"the TVM backend cannot lower {len(missing)} node(s):\n{lines}\n"
            "Keep these ops in PyTorch (run the converted model there), replace them with "
            "supported integer ops before convert(), or add a converter with "
            "djpq_compiler.backends.tvm.register(<target>)."
        )


class Lowering:
    """State of one lowering: the builder, the graph and the value of every lowered node."""

    def __init__(self, gm: fx.GraphModule, builder: Builder,
                 target: dict[str, Any] | None = None) -> None:
        self.gm = gm
        self.bb = builder
        #: The TVM target dict the module is built for (``None``: written kernels are off).
        self.target = target
        #: One ``kernels.KernelChoice`` per integer conv/linear, in graph order.
        self.kernels: list[Any] = []
        self.env: dict[fx.Node, Lowered] = {}
        self.params: list[Any] = []
        self.outputs: list[Any] = []
        self.output_kinds: list[str] = []
        self.output_tuple = False

    def module(self, node: fx.Node) -> Any:
        """The submodule a ``call_module`` node calls (typed loosely: converters know its class)."""
        return self.gm.get_submodule(str(node.target))

    def value(self, arg: Any) -> Any:
        """Map fx nodes inside ``arg`` (possibly nested) to their lowered values."""
        return fx.node.map_arg(arg, lambda n: self.env[n])  # type: ignore[arg-type,return-value]

    def int_arg(self, node: fx.Node, index: int = 0) -> IntValue:
        """The ``index``-th positional argument of ``node`` as integer codes."""
        value = self.value(node.args[index])
        if not isinstance(value, IntValue):
            raise BackendError(
                f"{node.format_node()}: expects integer codes as input {index}, got "
                f"{type(value).__name__}; a Quantize must precede integer ops"
            )
        return value

    def int_value(self, expr: Any, lo: int, hi: int) -> IntValue:
        """Cast ``expr`` to the container of ``[lo, hi]`` and wrap it."""
        return IntValue(self.bb.astype(expr, container_dtype(lo, hi)), lo, hi)


def lower(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
          target: dict[str, Any] | None = None) -> tuple[Any, Lowering]:
    """Lower a converted GraphModule to a Relax IRModule with one function ``main``.

    Args:
        gm: The converted model.
        example_inputs: One tensor per placeholder; fixes the static shapes and dtypes.
        target: The TVM target dict; integer conv/linear layers then get the written kernels
            the target supports (``backends/tvm/kernels``). ``None``: TVM's generic lowering.

    Returns:
        ``(IRModule, lowering)``; ``lowering.output_kinds`` says which outputs are integer codes.

    Raises:
        BackendError: Unsupported nodes (all listed at once) or bad inputs.
    """
    check_supported(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise BackendError(
            f"the model has {len(placeholders)} input(s) but {len(example_inputs)} example "
            "input(s) were given; pass one example tensor per input"
        )
    bb = Builder()
    ctx = Lowering(gm, bb, target)
    for node, example in zip(placeholders, example_inputs, strict=True):
        ctx.params.append(_input_var(bb, node, example))
    with bb.function("main", ctx.params):
        with bb.dataflow():
            for node in gm.graph.nodes:
                converter = converter_for(gm, node)
                if converter is None:  # pragma: no cover - check_supported ran first
                    raise BackendError(f"{node.format_node()}: no converter")
                ctx.env[node] = converter(ctx, node)
            out = bb.emit_output(ctx.outputs)
        mod = bb.finish(out)
    return mod, ctx


def _input_var(bb: Builder, node: fx.Node, example: torch.Tensor) -> Any:
    if not torch.is_tensor(example) or example.dtype != torch.float32:
        raise BackendError(
            f"{node.format_node()}: example input must be a float32 tensor (the converted model "
            f"quantizes its float input), got {getattr(example, 'dtype', type(example))}"
        )
    return bb.var(str(node.name), tuple(example.shape), "float32")


@register("placeholder")
def _placeholder(ctx: Lowering, node: fx.Node) -> Lowered:
    index = [n for n in ctx.gm.graph.nodes if n.op == "placeholder"].index(node)
    return FloatValue(ctx.params[index])


@register("output")
def _output(ctx: Lowering, node: fx.Node) -> Lowered:
    result = ctx.value(node.args[0])
    items = list(result) if isinstance(result, (tuple, list)) else [result]
    for item in items:
        if isinstance(item, IntValue):
            ctx.outputs.append(item.expr)
            ctx.output_kinds.append("int")
        elif isinstance(item, FloatValue):
            ctx.outputs.append(item.expr)
            ctx.output_kinds.append("float")
        else:
            raise BackendError(f"{node.format_node()}: outputs must be tensors, got {item!r}")
    ctx.output_tuple = isinstance(result, (tuple, list))
    return None


@register(operator.getitem)
def _getitem(ctx: Lowering, node: fx.Node) -> Lowered:
    container, index = ctx.value(node.args[0]), ctx.value(node.args[1])
    if isinstance(container, (tuple, list)):
        return container[index]
    from .shapes import slice_tensor

    return slice_tensor(ctx, node, container, index)

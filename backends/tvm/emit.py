"""Lower a converted GraphModule to a Relax IRModule: converter registry and lowering driver.

A converted graph (``records.stage(gm) == "converted"``) holds the integer modules of
``djpq_compiler.ir.modules`` plus shape ops. Each node is lowered by one
converter, looked up by the *target object*: the module class for ``call_module`` nodes, the
function for ``call_function`` nodes and the ``torch.Tensor`` method for ``call_method`` nodes.
Every converter has the signature ``(ctx: Lowering, node: Node) -> Lowered``; the registry
(:data:`CONVERTERS`), the context base and the unsupported-node report are shared with every
backend (``backends/lowering.py``).

Values flowing between converters carry their integer range, from which the container dtype is
chosen (uint8/int8 for 8 bits and below, uint16/int16, int32, int64): a sub-8-bit code lives in an
8-bit container (TVM's ``int4`` is broken, REFERENCE.md §3).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from djpq_compiler import records
from djpq_compiler.errors import BackendError
from djpq_compiler.registry import Registry

from .. import lowering
from .adapter import Builder
from .layout import NCHW, Layout, LayoutPlan, layout_lanes, plan_layouts, to_nchw

__all__ = [
    "CONVERTERS",
    "FloatValue",
    "IntValue",
    "LaneChain",
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
    """Integer codes in a narrow container; every element lies in ``[lo, hi]``.

    ``layout`` is the memory layout of ``expr`` (``layout.py``): NCHW unless a layout-aware
    converter produced a packed ``NCHW{L}c`` value; padding lanes then also hold codes in
    ``[lo, hi]`` (a kernel's ``clip(0)``, or a lane-wise op's result on such lanes)."""

    expr: Any
    lo: int
    hi: int
    layout: Layout = NCHW


@dataclass(frozen=True)
class LaneChain(IntValue):
    """A lane-wise integer op whose only user is another one (``converters.py``): not emitted
    yet, but kept as an expression tree (``kernels/eltwise.py``) over the values of ``leaves``,
    so that the chain's last op emits the whole chain as one kernel. ``expr`` is ``None``; only
    the chain's converters ever read such a value."""

    tree: Any = None
    leaves: tuple[fx.Node, ...] = ()
    ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class FloatValue:
    """A float32 tensor (the network input, a Dequantize or a float-output layer)."""

    expr: Any


#: What a converter returns: a tensor value, or a plain Python value (shape ints, tuples).
Lowered = IntValue | FloatValue | int | float | tuple | list | None
Converter = Callable[["Lowering", fx.Node], Lowered]

#: Every TVM converter, keyed like every registry (module class, function, Tensor method).
CONVERTERS = Registry[Converter]("TVM converter")
_PACKAGE = "djpq_compiler.backends.tvm"

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


def register(*targets: object) -> Callable[[Converter], Converter]:
    """Register a converter for module classes, functions or ``torch.Tensor`` methods."""
    return CONVERTERS.register(*targets)


def converter_for(gm: fx.GraphModule, node: fx.Node) -> Converter | None:
    """The converter of ``node``, or ``None`` if the backend cannot lower it."""
    return CONVERTERS.lookup(gm, node)


def unsupported_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Every node the backend cannot lower, with the reason, in graph order."""
    return lowering.unsupported_nodes(gm, CONVERTERS, "TVM")


def check_supported(gm: fx.GraphModule) -> None:
    """Raise one :class:`~djpq_compiler.errors.UnsupportedNodesError` listing every unsupported
    node of ``gm`` (a :class:`BackendError` for a model that is not converted)."""
    if records.stage(gm) != "converted":
        raise BackendError(
            "the TVM backend lowers converted models only (stage 'converted', got "
            f"{records.stage(gm)!r}); run djpq_compiler.convert() first"
        )
    lowering.raise_unsupported("TVM", _PACKAGE, unsupported_nodes(gm))


class Lowering(lowering.LoweringContext):
    """State of one lowering: the builder, the graph and the value of every lowered node."""

    INT_TYPES = (IntValue,)

    def __init__(self, gm: fx.GraphModule, builder: Builder,
                 target: dict[str, Any] | None = None) -> None:
        super().__init__(gm)
        self.bb = builder
        #: The TVM target dict the module is built for (``None``: written kernels are off).
        self.target = target
        #: One ``kernels.KernelChoice`` per integer conv/linear, in graph order.
        self.kernels: list[Any] = []
        self.params: list[Any] = []
        self.outputs: list[Any] = []
        self.output_kinds: list[str] = []
        self.output_tuple = False
        #: One ``kernels.eltwise.ChainRecord`` per fused lane-wise kernel, in graph order.
        self.eltwise: list[Any] = []
        #: Which values are planned packed (``layout.plan_layouts``; all NCHW without a target).
        self.plan: LayoutPlan = plan_layouts(gm, layout_lanes(_features(target)))
        self._unpacked: dict[fx.Node, IntValue] = {}

    def value(self, arg: Any) -> Any:
        """Lowered values of the fx nodes in ``arg``, packed integer values unpacked to NCHW
        (once per value): what every converter that does not know packed layouts reads."""
        return fx.node.map_arg(arg, self._plain)

    def _plain(self, node: fx.Node) -> Any:
        value = self.env[node]
        if not (isinstance(value, IntValue) and value.layout.packed):
            return value
        if node not in self._unpacked:
            self._unpacked[node] = IntValue(to_nchw(self.bb, value.expr, value.layout),
                                            value.lo, value.hi)
        return self._unpacked[node]

    def plain_int(self, node: fx.Node) -> IntValue:
        """The integer value of ``node`` in NCHW (unpacked once per value)."""
        value: IntValue = self._plain(node)
        return value

    def packed_int_arg(self, node: fx.Node, index: int = 0) -> IntValue:
        """The ``index``-th argument as integer codes *in whatever layout it has* (for the
        layout-aware converters only)."""
        arg = node.args[index]
        value = self.env[arg] if isinstance(arg, fx.Node) else None
        if isinstance(value, IntValue):
            return value
        return self.int_arg(node, index)  # raises the usual error for non-integer inputs

    def int_arg(self, node: fx.Node, index: int = 0) -> IntValue:
        """The ``index``-th positional argument of ``node`` as integer codes."""
        value: IntValue = super().int_arg(node, index)
        return value

    def int_value(self, expr: Any, lo: int, hi: int, layout: Layout = NCHW) -> IntValue:
        """Cast ``expr`` to the container of ``[lo, hi]`` and wrap it (in ``layout``)."""
        return IntValue(self.bb.astype(expr, container_dtype(lo, hi)), lo, hi, layout)


def _features(target: dict[str, Any] | None) -> frozenset[str] | None:
    from .kernels.emit import target_features

    return target_features(target)


def lower(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
          target: dict[str, Any] | None = None) -> tuple[Any, Lowering]:
    """Lower a converted GraphModule to a Relax IRModule with one function ``main``.

    Args:
        gm: The converted model.
        example_inputs: One tensor per placeholder; fixes the static shapes and dtypes.
        target: The TVM target dict; integer conv/linear layers then get the written kernels
            the target supports (``backends/tvm/kernels``), and values between them the packed
            layout of ``layout.layout_lanes`` (``layout.plan_layouts``). ``None``: TVM's generic
            lowering, NCHW everywhere.

    Returns:
        ``(IRModule, lowering)``; ``lowering.output_kinds`` says which outputs are integer codes.

    Raises:
        UnsupportedNodesError: Nodes without a converter or refused by theirs (all listed at
            once; a :class:`BackendError`).
        BackendError: Bad inputs.
    """
    check_supported(gm)  # fails fast, before TVM is started, on nodes without a converter
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
    try:
        with bb.function("main", ctx.params):
            with bb.dataflow():
                lowering.lower_nodes(ctx, CONVERTERS, "TVM", _PACKAGE)
                out = bb.emit_output(ctx.outputs)
            mod = bb.finish(out)
    except BaseException:
        bb.abandon()
        raise
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
    from .shapes import slice_tensor

    return lowering.index_or_slice(ctx, node, slice_tensor)

"""Registries of per-op knowledge, keyed by the op itself; one type for passes and backends.

A key is the module class (``nn.Conv2d``; subclasses match through the MRO), the function object
(``operator.add``, ``torch.cat``, ``F.relu``) or, for ``call_method`` nodes, the ``torch.Tensor``
method (``torch.Tensor.view``). Never ``__name__`` strings of functions or modules.

A method may also be given by its name (``"view"``): :func:`op_key` turns every name of a
``torch.Tensor`` method into the method object, when registering and when looking up, so
``"relu"`` and ``torch.Tensor.relu`` are one key. Other strings stay strings; backends register
their ``"placeholder"``, ``"get_attr"`` and ``"output"`` converters under those node ops.

The channel-dependency rules and sign facts of ``passes/`` and the converters of every backend
(``backends/tvm``, ``backends/onnx``) are :class:`Registry` instances: same keys, same lookup,
same :meth:`Registry.missing` report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import torch
import torch.fx as fx
from torch import nn

__all__ = ["CALL_OPS", "GRAPH_OPS", "Registry", "node_key", "op_key"]

R = TypeVar("R", bound=Callable[..., object])

#: The node ops that call something (the ones pass rules are looked up for).
CALL_OPS = ("call_module", "call_function", "call_method")
#: Every node op a backend lowers: the calls plus graph inputs, constants and the output.
GRAPH_OPS = ("placeholder", "get_attr", *CALL_OPS, "output")


def op_key(target: object) -> object:
    """The canonical key of an op: a ``torch.Tensor`` method name becomes the method object.

    ``op_key("relu") is torch.Tensor.relu``; every other target (module classes, functions,
    strings that name no tensor method) is returned unchanged.
    """
    if isinstance(target, str):
        method = getattr(torch.Tensor, target, None)
        if callable(method) and not isinstance(method, type):
            return method
    return target


def node_key(gm: fx.GraphModule, node: fx.Node) -> object | None:
    """The registry key of a node: module class, function object or ``torch.Tensor`` method;
    the node op itself for ``placeholder``, ``get_attr`` and ``output``."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target)))
    if node.op in CALL_OPS:
        return op_key(node.target)
    return node.op if node.op in GRAPH_OPS else None


def _inherits_forward(cls: type, base: type) -> bool:
    """Whether ``cls`` computes what ``base`` computes: it does not override ``forward``."""
    return getattr(cls, "forward", None) is getattr(base, "forward", None)


class Registry(Generic[R]):
    """Maps ops to one rule each; all rules of a registry share one signature.

    Args:
        name: What the rules are for (shown in reports), e.g. ``"TVM converter"``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._rules: dict[object, R] = {}

    def register(self, *keys: object) -> Callable[[R], R]:
        """Decorator registering ``fn`` for every key; returns ``fn`` unchanged."""

        def deco(fn: R) -> R:
            for key in keys:
                self._rules[op_key(key)] = fn
            return fn

        return deco

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def keys(self) -> list[object]:
        """Every registered key (canonical form), in registration order."""
        return list(self._rules)

    def get(self, key: object) -> R | None:
        """The rule for ``key``; a module class also matches the rule of a base class whose
        ``forward`` it inherits (a subclass that overrides ``forward`` computes something else
        and gets no rule: the safe answer)."""
        if key is None:
            return None
        key = op_key(key)
        try:
            if key in self._rules:
                return self._rules[key]
        except TypeError:  # unhashable target
            return None
        if isinstance(key, type) and issubclass(key, nn.Module):
            for base in key.__mro__[1:]:
                if base in self._rules and base is not nn.Module and _inherits_forward(key, base):
                    return self._rules[base]
        return None

    def lookup(self, gm: fx.GraphModule, node: fx.Node) -> R | None:
        """The rule for ``node`` or ``None`` when the op has no rule."""
        return self.get(node_key(gm, node))

    def missing(self, gm: fx.GraphModule, ignore: Iterable[str] = (),
                ops: Iterable[str] = CALL_OPS) -> list[fx.Node]:
        """Every node whose op has no rule, in graph order.

        Args:
            gm: The graph.
            ignore: Node names not to report.
            ops: The node ops that need a rule: the calls (the default; placeholders, get_attr
                and output excluded) or :data:`GRAPH_OPS` for a backend, which lowers them all.
        """
        skip, wanted = set(ignore), set(ops)
        return [
            n
            for n in gm.graph.nodes
            if n.op in wanted and n.name not in skip and self.lookup(gm, n) is None
        ]

"""Registries of per-op knowledge, keyed by the op itself.

A key is the module class (``nn.Conv2d``; subclasses match through the MRO), the function object
(``operator.add``, ``torch.cat``, ``F.relu``) or, for ``call_method`` nodes, the method name
(``"view"``). Never ``__name__`` strings of functions or modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import torch.fx as fx
from torch import nn

__all__ = ["Registry", "node_key"]

R = TypeVar("R", bound=Callable[..., object])


def node_key(gm: fx.GraphModule, node: fx.Node) -> object | None:
    """The registry key of a node: module class, function object or method name."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target)))
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


class Registry(Generic[R]):
    """Maps ops to one rule each; all rules of a registry share one signature."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._rules: dict[object, R] = {}

    def register(self, *keys: object) -> Callable[[R], R]:
        """Decorator registering ``fn`` for every key; returns ``fn`` unchanged."""

        def deco(fn: R) -> R:
            for key in keys:
                self._rules[key] = fn
            return fn

        return deco

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def get(self, key: object) -> R | None:
        """The rule for ``key``; module classes also match through their base classes."""
        if key is None:
            return None
        try:
            if key in self._rules:
                return self._rules[key]
        except TypeError:  # unhashable target
            return None
        if isinstance(key, type) and issubclass(key, nn.Module):
            for base in key.__mro__[1:]:
                if base in self._rules and base is not nn.Module:
                    return self._rules[base]
        return None

    def lookup(self, gm: fx.GraphModule, node: fx.Node) -> R | None:
        """The rule for ``node`` or ``None`` when the op has no rule."""
        return self.get(node_key(gm, node))

    def missing(self, gm: fx.GraphModule, ignore: Iterable[str] = ()) -> list[fx.Node]:
        """Every call node whose op has no rule (placeholders, get_attr and output excluded)."""
        skip = set(ignore)
        return [
            n
            for n in gm.graph.nodes
            if n.op in ("call_module", "call_function", "call_method")
            and n.name not in skip
            and self.lookup(gm, n) is None
        ]

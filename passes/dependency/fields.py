"""Channel bookkeeping through shape ops by running the op on a tensor of element ids.

Every entry of a *field* holds the global id of the channel element it comes from (-1: untracked).
Running ``view``/``permute``/``cat``/``split``/``getitem``... on fields, then checking whether the
ids vary along exactly one dimension, yields the op's index map for free (concat offsets, split
slices, flatten strides, permutations) without a hand-written rule per op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from djpq_compiler.layers import tensor_shape
from djpq_compiler.passes.dependency.state import AnalysisState, Field, Info, Opaque, Space
from djpq_compiler.records import NODE_VALUE

__all__ = ["to_field", "evaluate_on_fields", "clean_dim", "field_args"]


class _NoValue(Exception):
    """An argument's concrete value is unknown (no tensor_meta, no recorded value)."""


def to_field(st: AnalysisState, node: fx.Node) -> Any:
    """The field (or tuple of fields, or static value) standing for ``node``'s output."""
    info = st.info.get(node.name)
    if isinstance(info, tuple):
        return tuple(_one_field(st, item, None) for item in info)
    shape = tensor_shape(node)
    if shape is None:
        if NODE_VALUE in node.meta:
            return node.meta[NODE_VALUE]
        raise _NoValue(node.name)
    return _one_field(st, info, shape)


def _one_field(st: AnalysisState, info: Info, shape: tuple[int, ...] | None) -> torch.Tensor:
    if isinstance(info, Field):
        return info.ids
    if isinstance(info, Space) and shape is not None:
        view = [1] * len(shape)
        view[info.dim] = info.size
        ids = torch.arange(info.base, info.base + info.size, dtype=torch.int64).view(view)
        return ids.expand(shape).clone()
    if shape is None:
        raise _NoValue("structured value")
    return torch.full(shape, -1, dtype=torch.int64)


def field_args(st: AnalysisState, node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``node``'s args and kwargs with every node replaced by its field or static value."""
    mapped = fx.node.map_arg((node.args, node.kwargs), _Lazy)  # type: ignore[arg-type]
    args, kwargs = _resolve(st, mapped)
    return tuple(args), dict(kwargs)


class _Lazy:
    def __init__(self, node: fx.Node) -> None:
        self.node = node


def _resolve(st: AnalysisState, obj: Any) -> Any:
    if isinstance(obj, _Lazy):
        return to_field(st, obj.node)
    if isinstance(obj, tuple):
        return tuple(_resolve(st, o) for o in obj)
    if isinstance(obj, list):
        return [_resolve(st, o) for o in obj]
    if isinstance(obj, dict):
        return {k: _resolve(st, v) for k, v in obj.items()}
    if isinstance(obj, slice):  # x[:, : y.size(1)]: the bound is a node
        return slice(_resolve(st, obj.start), _resolve(st, obj.stop), _resolve(st, obj.step))
    return obj


def evaluate_on_fields(st: AnalysisState, node: fx.Node, fn: Any = None) -> Any | None:
    """Run ``node``'s op (or ``fn``) on fields; ``None`` when an argument has no known value or
    the op does not run on them (the caller then treats the node as opaque, never crashes)."""
    try:
        args, kwargs = field_args(st, node)
    except _NoValue:
        return None
    try:
        if fn is not None:
            return fn(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            return st.gm.get_submodule(str(node.target))(*args, **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]
    except (TypeError, ValueError, IndexError, RuntimeError):
        return None


def clean_dim(ids: torch.Tensor) -> int | None:
    """The one dimension along which ``ids`` varies (ids constant along all others), else None.

    A tensor constant everywhere has no channel dimension unless exactly one dimension has size
    greater than one after the batch dimension... it is reported as ``None`` (ambiguous).
    """
    if ids.ndim == 0:
        return None
    found = None
    for d in range(ids.ndim):
        index = [0] * ids.ndim
        index[d] = slice(None)  # type: ignore[call-overload]
        line = ids[tuple(index)]
        if ids.shape[d] <= 1 or bool((line == line[0]).all()):
            continue
        view = [1] * ids.ndim
        view[d] = ids.shape[d]
        if torch.equal(ids, line.view(view).expand_as(ids)):
            if found is not None:
                return None
            found = d
    return found


def line_along(ids: torch.Tensor, d: int) -> np.ndarray:
    """The ids along dimension ``d`` (at index 0 of every other dimension)."""
    index: list[Any] = [0] * ids.ndim
    index[d] = slice(None)
    return ids[tuple(index)].numpy().astype(np.int64)


def opaque_or_field(ids: torch.Tensor, reason: str) -> Field | Opaque:
    if bool((ids < 0).all()):
        return Opaque(reason)
    return Field(ids)

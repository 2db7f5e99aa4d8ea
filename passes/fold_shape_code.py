"""Fold-shape-code pass: replace shape code that is static after capture by its value.

Tracing leaves Python shape code in the graph: ``getattr(x, "ndim")``, ``x.shape``/``x.size()``
reads, ``operator.eq``/``floordiv``/``mul``/... on those ints and ``torch._assert`` on the
results (torchvision's ViT, ShuffleNet's channel shuffle, norm layers that check ``x.ndim``).
Every backend would otherwise need converters for Python arithmetic, so the converted model is
cleaned once, here, for all of them.

Requires: a graph whose tensor placeholders carry ``tensor_meta`` (the capture pass), in eval mode,
after pruning (channel counts are final; the sizes recorded at capture predate pruning, so this
pass re-runs the graph to read the current ones).
Guarantees:

* A node computing a Python value from tensor *shapes* only (a shape read, or a registered
  arithmetic/comparison op on such values; :data:`FOLDABLE`) is replaced by that value in every
  user, unless it depends on the batch size: a read of a batch axis (a dim that differs between
  runs at two batch sizes: ``x.size(0)``, ``x.shape[0]``, ``x.numel()``) and everything computed
  from it (``n // 2``, ``n * heads``) stay nodes, so the converted model keeps a free batch
  dimension (ONNX exports it symbolically). Values fed by non-tensor inputs are never folded.
* ``torch._assert(cond, msg)`` with a folded (or literal) ``cond`` is removed when it holds; when
  it does not (pruning changed a size the model checks) a :class:`PruningError` names the node.
  The guards capture inserted for shape conditions it decided (``capture.GUARD_PREFIX``) and the
  shape code feeding them are kept: they make a call with other input shapes fail loudly
  instead of running the branch taken at capture.
* A placeholder that carries a default value (``attn_mask=None``, ``is_causal=False``) and
  received no tensor at capture is replaced by its default, so the converted model takes only
  the inputs it was captured with.
* Nothing else changes: tensor ops, their order and their results are untouched.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import PruningError
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.passes.capture import GUARD_PREFIX
from djpq_compiler.records import NODE_VALUE

__all__ = ["fold_shape_code", "FOLDABLE", "SHAPE_READS"]

#: Reads of a tensor's shape (registry keys: the function, or the ``torch.Tensor`` method).
SHAPE_READS: frozenset[object] = facts.SHAPE_READS
#: Attributes a ``getattr`` shape read may fetch.
_SHAPE_ATTRS = frozenset({"shape", "ndim"})

#: Every target whose result is folded when it is static: shape reads and Python arithmetic,
#: comparisons and indexing on their values.
FOLDABLE: frozenset[object] = SHAPE_READS | frozenset({
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
    operator.truediv, operator.mod, operator.pow, operator.neg, operator.pos,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.not_, operator.and_, operator.or_, builtins.len, builtins.int, builtins.min,
    builtins.max, math.prod, math.sqrt, math.ceil, math.floor,
})

_ASSERTS: frozenset[object] = frozenset({torch._assert})


def _key(node: fx.Node) -> object | None:
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return getattr(torch.Tensor, str(node.target), None)
    return None


def _is_static(value: Any) -> bool:
    """A plain Python value a graph argument can hold: bool/int/float, or a tuple of ints."""
    if isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, (tuple, list)):  # torch.Size is a tuple
        return all(isinstance(v, (bool, int)) for v in value)
    return False


class _Recorder(fx.Interpreter):
    """Runs the graph once, keeping the values of foldable nodes and the shapes of the tensors
    whose shape they read; asserts and quantizers are skipped (quantizers do not change shapes,
    and a calibrating one must not observe this run)."""

    def __init__(self, gm: fx.GraphModule, foldable: set[fx.Node]) -> None:
        super().__init__(gm)
        self.foldable = foldable
        self.read = {n.args[0] for n in foldable if _key(n) in SHAPE_READS}
        self.values: dict[fx.Node, Any] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if _key(n) in _ASSERTS:
            return None
        result = super().run_node(n)
        if n in self.foldable:
            self.values[n] = result
        if n in self.read and torch.is_tensor(result):
            self.shapes[n] = tuple(result.shape)
        return result

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(self.fetch_attr(str(target)), DQQuantizer):
            return args[0]
        return super().call_module(target, args, kwargs)


def _shape_derived(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value is a function of tensor shapes only (see module docstring)."""
    derived: set[fx.Node] = set()
    for node in gm.graph.nodes:
        key = _key(node)
        if key not in FOLDABLE:
            continue
        if key is builtins.getattr and (len(node.args) < 2 or node.args[1] not in _SHAPE_ATTRS):
            continue
        inputs = node.all_input_nodes
        if key in SHAPE_READS:  # reads the shape of its first argument (a tensor node)
            ok = bool(inputs) and inputs[0] is node.args[0] and all(
                a in derived for a in inputs[1:])
        else:  # arithmetic: every operand node must be shape-derived itself
            ok = all(a in derived for a in inputs)
        if ok:
            derived.add(node)
    return derived


def _inputs(gm: fx.GraphModule, batch: int) -> list[Any] | None:
    """Example inputs rebuilt from the placeholders' recorded shapes, at batch size ``batch``."""
    out: list[Any] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            out.append(node.meta.get(NODE_VALUE, node.args[0] if node.args else None))
            continue
        shape = [int(s) for s in meta.shape]
        if shape:
            shape[0] = batch
        dtype = meta.dtype
        out.append(torch.randn(shape, dtype=dtype) if dtype.is_floating_point
                   else torch.zeros(shape, dtype=dtype))
    return out


def _captured_batch(gm: fx.GraphModule) -> int | None:
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta") if node.op == "placeholder" else None
        if meta is not None and len(meta.shape) > 0:
            return int(meta.shape[0])
    return None


def _record(gm: fx.GraphModule, foldable: set[fx.Node], batch: int) -> _Recorder | None:
    """One run at ``batch`` (values of ``foldable`` nodes, shapes they read); ``None`` if the
    graph cannot run there."""
    inputs = _inputs(gm, batch)
    recorder = _Recorder(gm, foldable)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            recorder.run(*inputs)  # type: ignore[misc]
    except Exception:  # the graph may be specialized to some batch sizes
        return None
    finally:
        gm.train(was_training)
    return recorder


#: Per-element batch dependence of a value: a bool, or a tuple of bools for a shape tuple.
Taint = bool | tuple[bool, ...]


def _any(taint: Taint) -> bool:
    return any(taint) if isinstance(taint, tuple) else bool(taint)


def _read_taint(node: fx.Node, batch_axes: set[int], ndim: int, first: _Recorder) -> Taint:
    """Which parts of a shape read follow the batch: ``x.shape``/``x.size()`` per element,
    ``x.size(d)`` by ``d``, ``x.numel()`` if any batch axis, ``x.ndim``/``x.dim()`` never."""
    key, attr = _key(node), node.args[1] if len(node.args) > 1 else None
    if key in (torch.Tensor.dim, torch.Tensor.ndimension) or (
            key is builtins.getattr and attr == "ndim"):
        return False
    if key in (torch.Tensor.numel, torch.numel):
        return bool(batch_axes)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if key is torch.Tensor.size and dim is not None:
        dim = first.values.get(dim, dim) if isinstance(dim, fx.Node) else dim
        return not isinstance(dim, int) or dim % max(ndim, 1) in batch_axes
    return tuple(i in batch_axes for i in range(ndim))


def _taint(node: fx.Node, taints: dict[fx.Node, Taint], first: _Recorder,
           second: _Recorder) -> Taint:
    """Batch dependence of a foldable node, from the batch axes of the tensors whose shape is
    read (the dims that differ between the two runs) through every op that uses the value."""
    if _key(node) in SHAPE_READS:
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return True
        a, b = first.shapes.get(src), second.shapes.get(src)
        if a is None or b is None or len(a) != len(b):
            return True
        axes = {i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y}
        return _read_taint(node, axes, len(a), first)
    source = node.args[0] if node.args else None
    mask = taints.get(source) if isinstance(source, fx.Node) else None
    if _key(node) is operator.getitem and isinstance(mask, tuple) and \
            not isinstance(node.args[1], fx.Node):
        try:
            return mask[node.args[1]]  # type: ignore[index]
        except (IndexError, TypeError):
            return True
    return any(_any(taints.get(a, True)) for a in node.all_input_nodes)


def _static_values(gm: fx.GraphModule, foldable: set[fx.Node]) -> dict[fx.Node, Any]:
    """The values of ``foldable`` nodes that do not depend on the batch size: every size they
    are computed from is a non-batch dim (the dims that differ between runs at batch 1 and 8,
    far enough apart that ``n // k`` changes for small ``k``; for models that cannot run there,
    the captured batch and 4x it), and the value itself is the same in both runs."""
    batch = _captured_batch(gm)
    if batch is None or not foldable:
        return {}
    first = second = None
    for small, large in ((1, 8), (batch, 4 * batch)):
        first = _record(gm, foldable, small)
        second = _record(gm, foldable, large) if first is not None else None
        if second is not None:
            break
    if first is None or second is None:
        return {}
    taints: dict[fx.Node, Taint] = {}
    static: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node not in foldable:
            continue
        taints[node] = _taint(node, taints, first, second)
        value, again = first.values.get(node), second.values.get(node, None)
        if not _any(taints[node]) and node in first.values and _is_static(value) and \
                type(again) is type(value) and again == value:
            static[node] = value
    return static


def _substitute(node: fx.Node, value: Any) -> None:
    """Replace every use of ``node`` by the constant ``value`` (a ``torch.Size`` as a tuple)."""
    if isinstance(value, torch.Size):
        value = tuple(int(v) for v in value)
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)


def _fold_defaults(gm: fx.GraphModule) -> bool:
    """Replace defaulted placeholders that got no tensor at capture by their default."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or not node.args or "tensor_meta" in node.meta:
            continue
        default = node.args[0]
        recorded = node.meta.get(NODE_VALUE, default)
        if recorded is not default and recorded != default:
            continue  # a non-tensor input given explicitly with another value: keep it
        _substitute(node, default)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _is_capture_guard(node: fx.Node) -> bool:
    """Whether ``node`` is a ``torch._assert`` guard that capture inserted."""
    if _key(node) not in _ASSERTS:
        return False
    message = node.args[1] if len(node.args) > 1 else node.kwargs.get("msg", "")
    return isinstance(message, str) and message.startswith(GUARD_PREFIX)


def _guard_inputs(gm: fx.GraphModule, foldable: set[fx.Node]) -> set[fx.Node]:
    """The foldable nodes that feed capture guards (kept, so the guards still check)."""
    cone: set[fx.Node] = set()
    stack = [a for n in gm.graph.nodes if _is_capture_guard(n) for a in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in foldable and node not in cone:
            cone.add(node)
            stack.extend(node.all_input_nodes)
    return cone


def _fold_asserts(gm: fx.GraphModule) -> bool:
    """Remove ``torch._assert`` nodes with a constant condition; raise when it is false."""
    changed = False
    for node in list(gm.graph.nodes):
        if _key(node) not in _ASSERTS or not node.args:
            continue
        cond = node.args[0]
        if isinstance(cond, fx.Node) or _is_capture_guard(node):
            continue  # depends on the batch or on tensor values: kept
        if not bool(cond):
            message = node.args[1] if len(node.args) > 1 else node.kwargs.get("msg", "")
            raise PruningError(
                f"{node.format_node()}: this shape check holds for the captured model but not "
                f"after pruning ({message!r}); the model checks a size that pruning changed. "
                "Keep those channels (exclude the layer from pruning) or drop the check.")
        gm.graph.erase_node(node)
        changed = True
    return changed


def fold_shape_code(gm: fx.GraphModule) -> PassResult:
    """Fold static shape code and shape asserts (see module docstring).

    Args:
        gm: A captured (possibly pruned) graph in eval mode; modified in place.

    Returns:
        ``PassResult(gm, modified)``.

    Raises:
        PruningError: A ``torch._assert`` on shapes is false for the pruned model.
    """
    changed = _fold_defaults(gm)
    foldable = _shape_derived(gm)
    foldable -= _guard_inputs(gm, foldable)
    values = _static_values(gm, foldable)
    for node in gm.graph.nodes:
        if node in values:
            _substitute(node, values[node])
            changed = True
    changed = _fold_asserts(gm) or changed
    for node in reversed(list(gm.graph.nodes)):
        if node in foldable and not node.users:
            gm.graph.erase_node(node)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


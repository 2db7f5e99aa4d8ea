"""Capture pass: ``nn.Module`` -> ``torch.fx.GraphModule`` with shapes in ``node.meta``.

Requires: a model whose forward can be symbolically traced and example inputs it accepts.

Why there is no ``torch.export`` fallback: when ``torch.fx.symbolic_trace`` fails, the pass tries
``torch.export.export`` only to tell the user what it found. An exported program is an
*aten-level* graph (``torch.ops.aten.conv2d.default``, ``aten.batch_norm``, parameters as
``get_attr`` nodes, a pytree output, an ``eval()`` that raises): no channel rule covers those ops,
so every channel would be a barrier and nothing could be pruned, and ``prepare`` could not attach
module quantizers. Rather than fall back silently to a graph the passes do not understand, the
``CaptureError`` says that torch.export could capture the model, that aten-level graphs are not
supported yet, and how to make the forward symbolically traceable.
Guarantees: the returned ``GraphModule`` owns deep copies of the model's modules (the user's model
is never modified), every tensor-valued node carries ``node.meta["tensor_meta"]``
(``torch.fx.passes.shape_prop.TensorMetadata``), small non-tensor results (``x.size(0)``, shapes)
carry their value in ``node.meta["djpq.value"]``, and ``gm.meta["djpq.capture"]`` says how the
graph was obtained. Unused pieces of a tuple (``a, b = torch.split(x, ...)`` with ``b`` never
read: a dead ``getitem``) are dropped, so that no later pass's dead-code elimination removes a node
the channel analysis refers to.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import operator
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp

from djpq_compiler.errors import CaptureError
from djpq_compiler.layers import tensor_shape

__all__ = ["capture", "as_input_tuple", "propagate_shapes", "export_probe", "graph_signature"]

_HOW_TO_FIX = (
    "Make the forward traceable: move data-dependent Python control flow into a submodule and "
    "pass its class in leaf_modules=(...) so it is kept opaque, or fix the branch with "
    "concrete_args={'arg': value}."
)


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalize ``example_inputs`` (a tensor or a tuple/list of arguments) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise CaptureError(
        f"example_inputs must be a tensor or a tuple of forward arguments, got "
        f"{type(example_inputs).__name__}"
    )


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self._leaves = leaf_modules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaves and isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and this package (the user's code)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = frame.filename
        if "/torch/" not in name and "djpq_compiler" not in name and "/passes/" not in name:
            return f"{name}:{frame.lineno} ({frame.line})"
    return "unknown location"


def export_probe(model: nn.Module, inputs: Sequence[Any]) -> str:
    """One sentence on whether ``torch.export`` can capture ``model`` (for the CaptureError).

    The exported program is never used: aten-level graphs have no channel rules (module
    docstring). ``model`` should be a copy; export may run its forward.
    """
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(model, tuple(inputs))
    except Exception as exc:  # export raises UserError, GuardOnDataDependent..., RuntimeError
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"torch.export could not capture it either ({type(exc).__name__}: {first})."
    ops = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"})
    return (f"torch.export could capture it, but only as an aten-level graph ({', '.join(ops[:4])}"
            f"{', ...' if len(ops) > 4 else ''}), and aten-level graphs are not supported yet: no "
            "channel rule covers aten ops, so every channel would be a barrier. djpq-compiler "
            "does not fall back to it. Since torch.export could specialize the forward, the "
            "failing branch most likely depends only on shapes: decide it in __init__ instead.")


def _trace(
    model: nn.Module,
    leaf_modules: tuple[type[nn.Module], ...],
    concrete_args: dict[str, Any] | None,
    inputs: Sequence[Any],
) -> fx.GraphModule:
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # FX raises TraceError, TypeError, RuntimeError, ...
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            f"  at {_user_frame(exc)}\n  {export_probe(model, inputs)}\n  {_HOW_TO_FIX}"
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


#: Pure ops whose whole result may go unused after their dead getitems are gone.
_PURE_TUPLE_OPS = (operator.getitem, torch.split, torch.chunk, torch.unbind, torch.tensor_split,
                   "split", "chunk", "unbind", "tensor_split")


def drop_dead_getitems(gm: fx.GraphModule) -> int:
    """Erase unread ``operator.getitem`` nodes, then unread splits/chunks (all pure).

    Only these: other dead nodes may be in-place methods (``x.mul_(2)``) that FX's own dead-code
    elimination would wrongly consider pure.

    Returns:
        How many nodes were erased.
    """
    erased = 0
    for node in reversed(list(gm.graph.nodes)):  # users before producers
        if (node.op in ("call_function", "call_method") and node.target in _PURE_TUPLE_OPS
                and not node.users):
            gm.graph.erase_node(node)
            erased += 1
    if erased:
        gm.recompile()
    return erased


class _RecordingShapeProp(ShapeProp):
    """ShapeProp that also records small non-tensor results (sizes, ints) as ``djpq.value``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if _is_static_value(result):
            n.meta["djpq.value"] = result
        return result


def _is_static_value(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, torch.Size, torch.dtype, torch.device)):
        return True
    if isinstance(value, (tuple, list)) and len(value) <= 16:
        return all(isinstance(v, (bool, int, float)) for v in value)
    return False


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Run ``gm`` once on ``inputs`` (eval mode, no grad) recording ``tensor_meta`` per node.

    The module's train/eval state is restored afterwards, so BatchNorm statistics are untouched.
    """
    was_training = gm.training
    gm.eval()
    try:
        # ShapeProp prints the traceback itself before raising; our message replaces it
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            _RecordingShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        node_text = _failing_node(exc)
        raise CaptureError(
            f"running {gm.__class__.__name__} on the example inputs failed at {node_text}: "
            f"{type(exc).__name__}: {_root_message(exc)}\n  Check that example_inputs have the "
            f"shape and dtype the model expects (got {_describe(inputs)})."
        ) from exc
    finally:
        gm.train(was_training)


def _describe(inputs: Sequence[Any]) -> str:
    return ", ".join(
        f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        for t in inputs
    )


def _root_message(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _failing_node(exc: BaseException) -> str:
    text = str(exc)
    marker = "node="
    if marker in text:  # ShapeProp: "node=<format_node()> with meta={...}"; drop the meta dump
        return text[text.index(marker) :].splitlines()[0].split(" with meta=")[0]
    return "an unknown node"


def graph_signature(gm: fx.GraphModule) -> str:
    """SHA-256 over every node's op, target (module class for modules) and output shape."""
    items = []
    for node in gm.graph.nodes:
        if node.op in ("call_module",):
            target = type(gm.get_submodule(str(node.target))).__name__ + ":" + str(node.target)
        else:
            target = getattr(node.target, "__name__", str(node.target))
        items.append(f"{node.op}|{target}|{tensor_shape(node)}")
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: tuple[type[nn.Module], ...] = (),
    concrete_args: dict[str, Any] | None = None,
    copy_model: bool = True,
) -> PassResult:
    """Trace ``model`` with ``torch.fx`` and record tensor shapes in ``node.meta``.

    Args:
        model: The model to capture. It is deep-copied first unless ``copy_model`` is False.
        example_inputs: A tensor or tuple of forward arguments used for shape propagation.
        leaf_modules: Module classes kept as opaque ``call_module`` nodes.
        concrete_args: Passed to the FX tracer to specialize Python control flow.
        copy_model: Trace a deep copy (default) so the caller's model is never modified.

    Returns:
        ``PassResult`` whose ``graph_module`` is the captured ``GraphModule``.

    Raises:
        CaptureError: tracing failed (with FX's reason, the user code location and whether
            ``torch.export`` could capture it instead) or the example inputs do not fit the model
            (naming the failing node).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    source = copy.deepcopy(model) if copy_model else model
    gm = _trace(source, tuple(leaf_modules), concrete_args, inputs)
    drop_dead_getitems(gm)
    gm.train(model.training)
    propagate_shapes(gm, inputs)
    gm.meta["djpq.capture"] = "torch.fx.symbolic_trace"
    gm.meta["djpq.signature"] = graph_signature(gm)
    gm.meta["djpq.source_params"] = sum(p.numel() for p in gm.parameters())
    gm.meta["djpq.source_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    return PassResult(gm, True)

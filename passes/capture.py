"""Capture pass: ``nn.Module`` -> ``torch.fx.GraphModule`` with shapes in ``node.meta``.

Requires: a model whose forward can be symbolically traced and example inputs it accepts.

Fallback for shape-dependent Python control flow [choice]: when ``torch.fx.symbolic_trace``
fails because Python needs the value of a traced expression (``if x.shape[-1] != 8:``,
``if new_h != H:``, iterating over a size), the model is traced again with every node's value
computed on the example inputs alongside (:class:`_ConcreteTracer`). A condition computed from
shapes only is then decided by its example value -- the specialization ``torch.export`` performs
for static shapes -- and kept in the graph as a ``torch._assert`` guard, so a later input that
would take the other branch fails loudly instead of silently running the wrong one. A condition
on tensor *values* (``if x.sum() > 0``) is refused, as ``torch.export`` refuses it. The graph
stays module-level (``nn.Conv2d`` call_module nodes), unlike ``torch.export``'s aten-level graph,
on which no channel rule or quantizer placement works (every channel would be a barrier); the
``CaptureError`` still says whether ``torch.export`` could capture a model both tracers refuse.
The capture record (``CaptureRecord.specialized``) lists the decided conditions.
Guarantees: the returned ``GraphModule`` owns deep copies of the model's modules (the user's model
is never modified), every tensor-valued node carries ``node.meta["tensor_meta"]``
(``torch.fx.passes.shape_prop.TensorMetadata``), small non-tensor results (``x.size(0)``, shapes)
carry their value in ``node.meta[NODE_VALUE]``, and the returned :class:`CaptureRecord` (also
stored on the graph, read by :func:`~djpq_compiler.records.capture_record`) says how the graph was
obtained. Unused pieces of a tuple (``a, b = torch.split(x, ...)`` with ``b`` never
read: a dead ``getitem``) are dropped, so that no later pass's dead-code elimination removes a node
the channel analysis refers to.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import keyword
import operator
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _assert_is_none, _orig_module_call, _orig_module_getattr
from torch.fx.passes.shape_prop import ShapeProp

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import CaptureError, CaptureWarning
from djpq_compiler.layers import tensor_shape
from djpq_compiler.passes.functional_norms import functional_norms_to_modules
from djpq_compiler.passes.pipeline import Recorded
from djpq_compiler.records import NODE_VALUE, CaptureRecord, store

__all__ = ["capture", "as_input_tuple", "propagate_shapes", "export_probe", "graph_signature",
           "check_finite_inputs", "check_attribute_names"]

#: Start of the message of every ``torch._assert`` guard that capture inserts for a shape
#: condition it decided; later passes keep these guards (``passes/fold_shape_code.py``).
GUARD_PREFIX = "djpq: the model was captured for inputs where"

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


def check_finite_inputs(value: Any, where: str = "example_inputs") -> None:
    """Raise :class:`CaptureError` naming the argument when a floating-point tensor in ``value``
    (a tensor or nested tuples/lists/dicts of them) holds NaN or infinity."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                kind = "NaN" if bool(torch.isnan(value).any()) else "infinite"
                raise CaptureError(
                    f"{where} holds {int(bad.sum())} {kind} value(s) (shape "
                    f"{tuple(value.shape)}); pass finite inputs (e.g. real data or "
                    f"torch.randn): shapes, calibration ranges and BOPs are computed from them")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            check_finite_inputs(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_finite_inputs(item, f"{where}[{key!r}]")


def _codegen_unsafe(name: str) -> bool:
    """Whether torch.fx's generated code mangles attribute ``name``: it writes ``self.name`` for
    identifiers (a Python keyword is then a syntax error) and ``getattr(self, "name")`` for the
    rest, unescaped (a quote breaks it; a backslash or control character becomes an escape that
    names another attribute)."""
    return keyword.iskeyword(name) or any(c in name for c in "\"\\") or not name.isprintable()


def check_attribute_names(model: nn.Module) -> None:
    """Raise :class:`CaptureError` listing the submodules, parameters and buffers of ``model``
    whose names torch.fx cannot write into Python code (:func:`_codegen_unsafe`): tracing would
    fail with a ``SyntaxError`` or, worse, read another attribute."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    names += [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    bad = sorted({n for n in names if any(_codegen_unsafe(part) for part in n.split("."))})
    if bad:
        raise CaptureError(
            f"{type(model).__name__}: torch.fx cannot generate code for the attribute name(s) "
            f"{bad[:8]}{' ...' if len(bad) > 8 else ''} (a Python keyword, a quote, a backslash "
            "or a control character in a submodule/parameter/buffer name). Rename them to "
            "identifier-like names (and use the new names in forward).")


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type[nn.Module], ...] = ()) -> None:
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
            "does not fall back to it, and its own fallback (deciding branches on shapes from "
            "the example inputs) did not apply: decide the failing branch in __init__ instead.")


def _trace(
    model: nn.Module,
    leaf_modules: tuple[type[nn.Module], ...],
    concrete_args: dict[str, Any] | None,
    inputs: Sequence[Any],
) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """The traced module and the shape conditions decided by the example inputs."""
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # FX raises TraceError, TypeError, RuntimeError, ...
        specialized = _trace_concretely(model, leaf_modules, concrete_args, inputs, exc)
        if specialized is not None:
            return specialized
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            f"  at {_user_frame(exc)}\n  {export_probe(model, inputs)}\n  {_HOW_TO_FIX}"
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name), ()


#: Pure ops whose whole result may go unused after their dead getitems are gone.
_PURE_TUPLE_OPS = facts.TUPLE_PRODUCERS + facts.GETITEM_OP.keys()


_GUARDS = (torch._assert, _assert_is_none)


def _drop_concrete_placeholders(gm: fx.GraphModule) -> None:
    """Remove the placeholders FX keeps for ``concrete_args`` when they only feed FX's own guards
    (``mode == value`` -> ``torch._assert``, ``_assert_is_none``): the captured model then takes
    the example inputs alone, as ``prepare``/``analyze`` call it (the values are fixed)."""
    for ph in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        users = list(ph.users)
        doomed = []
        for user in users:
            if user.target in _GUARDS:
                doomed.append(user)
            elif user.op == "call_function" and user.target is operator.eq and user.users \
                    and all(u.target is torch._assert for u in user.users):
                doomed += [*user.users, user]
            else:
                break
        else:
            if users:
                for node in [*doomed, ph]:
                    gm.graph.erase_node(node)
    gm.recompile()


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


def _trace_concretely(model: nn.Module, leaf_modules: tuple[type[nn.Module], ...],
                      concrete_args: dict[str, Any] | None, inputs: Sequence[Any],
                      exc: BaseException) -> tuple[fx.GraphModule, tuple[str, ...]] | None:
    """The fallback of the module docstring, or ``None`` when it does not apply or fails."""
    if concrete_args is not None or not isinstance(exc, (fx.proxy.TraceError, TypeError)):
        return None
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    tracer = _ConcreteTracer(leaf_modules, inputs)
    try:
        graph = tracer.trace(model)
    except Exception:  # a value-dependent branch or an op that fails on the examples
        return None
    finally:
        with torch.no_grad():  # running the ops may have updated BN statistics
            for key, value in model.state_dict(keep_vars=True).items():
                value.copy_(state[key])
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    warnings.warn(CaptureWarning(
        f"{type(model).__name__}: torch.fx could not trace it ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); captured it instead for the example "
        f"inputs' shapes, deciding {len(tracer.specialized)} shape condition(s) by their example "
        f"values ({'; '.join(tracer.specialized[:3])}). The graph asserts them at run time."),
        stacklevel=4)
    return gm, tuple(tracer.specialized)


#: Ops that read only a tensor's metadata (its shape), never its values.
_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension"})


@contextlib.contextmanager
def _modules_unpatched() -> Iterator[None]:
    """Plain ``nn.Module.__call__``/``__getattr__`` while a trace has them patched: modules run
    on concrete values without recording nodes."""
    call, get = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__ = _orig_module_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = _orig_module_getattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = call  # type: ignore[method-assign]
        nn.Module.__getattr__ = get  # type: ignore[method-assign]


class _ConcreteTracer(_LeafTracer):
    """A tracer that also computes every node's value on the example inputs, so that Python
    control flow on shapes can be decided (and guarded) instead of failing."""

    def __init__(self, leaf_modules: tuple[type[nn.Module], ...] = (),
                 inputs: Sequence[Any] = ()) -> None:
        super().__init__(leaf_modules)
        self._inputs = list(inputs)
        self._values: dict[fx.Node, Any] = {}
        self.specialized: list[str] = []

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any,
                    name: str | None = None, type_expr: Any | None = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output":
            self._values[node] = self._evaluate(node)
        return node

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            if self._inputs:
                return self._inputs.pop(0)
            if node.args:  # a forward parameter with a default, not given
                return node.args[0]
            raise CaptureError("more forward arguments than example inputs")
        args = fx.node.map_arg(node.args, self._values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self._values.__getitem__)
        with torch.no_grad(), _modules_unpatched():
            if node.op == "get_attr":
                return operator.attrgetter(str(node.target))(self.root)
            if node.op == "call_module":
                return self.root.get_submodule(str(node.target))(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
            fn = cast(Callable[..., Any], node.target)
            return fn(*args, **kwargs)

    def _shape_only(self, node: fx.Node) -> bool:
        """Whether ``node``'s value depends on tensors only through their shapes."""
        if isinstance(self._values.get(node), torch.Tensor):
            return False
        for arg in node.all_input_nodes:
            if isinstance(self._values.get(arg), torch.Tensor):
                reads_metadata = (
                    (node.target is getattr and node.args[1] in _METADATA_ATTRS)
                    or (node.op == "call_method" and node.target in _METADATA_METHODS)
                    or node.target is torch.numel)
                if not reads_metadata:
                    return False
            elif not self._shape_only(arg):
                return False
        return True

    def to_bool(self, obj: fx.Proxy) -> bool:
        node = obj.node
        if not self._shape_only(node):
            raise fx.proxy.TraceError(f"control flow on tensor values at {node.format_node()}")
        value = bool(self._values[node])
        cond = obj if value else self.create_proxy("call_function", operator.not_, (obj,), {})
        text = f"{node.format_node()} is {value}"
        self.create_proxy("call_function", torch._assert, (
            cond, f"{GUARD_PREFIX} {node.name} is {value} (a "
                  "shape condition); prepare it again with example inputs of this shape"), {})
        self.specialized.append(text)
        return value

    def iter(self, obj: fx.Proxy) -> Any:
        value = self._values.get(obj.node)
        if not isinstance(value, (tuple, list, torch.Size, torch.Tensor)):
            return super().iter(obj)
        items = cast(Any, obj)
        return iter([items[i] for i in range(len(value))])


class _RecordingShapeProp(ShapeProp):
    """ShapeProp that also records small non-tensor results (sizes, ints) as ``NODE_VALUE``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if _is_static_value(result):
            n.meta[NODE_VALUE] = result
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
) -> Recorded[CaptureRecord]:
    """Trace ``model`` with ``torch.fx`` and record tensor shapes in ``node.meta``.

    Args:
        model: The model to capture. It is deep-copied first unless ``copy_model`` is False.
        example_inputs: A tensor or tuple of forward arguments used for shape propagation.
        leaf_modules: Module classes kept as opaque ``call_module`` nodes.
        concrete_args: Passed to the FX tracer to specialize Python control flow.
        copy_model: Trace a deep copy (default) so the caller's model is never modified.

    Returns:
        ``Recorded(graph_module, record)``: the captured ``GraphModule`` and its
        :class:`~djpq_compiler.records.CaptureRecord` (also stored on the graph).

    Raises:
        CaptureError: tracing failed (with FX's reason, the user code location and whether
            ``torch.export`` could capture it instead), the example inputs hold NaN/inf (naming
            the argument) or do not fit the model (naming the failing node), or a submodule,
            parameter or buffer name cannot be written into torch.fx's code (naming it).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    check_finite_inputs(example_inputs)
    check_attribute_names(model)
    source = copy.deepcopy(model) if copy_model else model
    gm, specialized = _trace(source, tuple(leaf_modules), concrete_args, inputs)
    if concrete_args:
        _drop_concrete_placeholders(gm)
    drop_dead_getitems(gm)
    gm.train(model.training)
    propagate_shapes(gm, inputs)
    functional_norms_to_modules(gm)  # F.batch_norm of BN-act layers -> nn.BatchNorm modules
    record = CaptureRecord(
        how="torch.fx.symbolic_trace" + (", shapes specialized" if specialized else ""),
        specialized=specialized, signature=graph_signature(gm),
        source_class=f"{type(model).__module__}.{type(model).__qualname__}",
        source_params=sum(p.numel() for p in gm.parameters()))
    store(gm, record)
    return Recorded(gm, record)

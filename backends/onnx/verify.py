"""``verify(converted, onnx_path, example_inputs)``: onnxruntime against the PyTorch reference.

The reference is the converted GraphModule itself, run in PyTorch (integer semantics of
``djpq_compiler/ir``). Integer results are compared as codes, so a difference is directly in
LSB. A float output of an integer layer (``IntConv2d``/``IntLinear`` with ``out_scale=None``) is
compared in units of ``u_c = in_scale * w_scale[c] * sum_k |w_q[c, k]|``: the largest change of
output channel ``c`` when every input code moves by one LSB. Since onnxruntime agrees with the
reference to <= 1 LSB on the layer's input codes and accumulates exactly otherwise (float32
error ~1e-7 relative), a correct export stays within 1 such unit.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im

from .export import require_onnx

__all__ = ["CHUNK", "VerifyRun", "verify"]

#: numpy dtype of each ONNX integer element type an integer activation may be held in.
_NP_TYPES = {2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64}


class _Kinds(fx.Interpreter):
    """Runs the reference once, keeping nothing but which nodes give integer tensors (values are
    freed after their last use, as in any interpreter run)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.integer: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if torch.is_tensor(result) and not result.is_floating_point():
            self.integer.append(n.name)
        return result


class _Streamer(fx.Interpreter):
    """Runs the reference again and hands each value of ``keep`` to ``take`` as soon as it is
    computed; nothing else is kept beyond its last use."""

    def __init__(self, gm: fx.GraphModule, keep: set[str],
                 take: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # errors from ``take`` (onnxruntime) keep their message
        self._keep, self._take = keep, take

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self._keep:
            self._take(n.name, result.detach())
        return result


def _session(model: Any) -> Any:
    """An onnxruntime CPU session of ``model`` (a ``ModelProto``, or a file path: the same bytes,
    without a serialized copy)."""
    ort = require_onnx(runtime=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _release() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere), so that
    what a finished session or model copy held (freed by reference count) does not stay
    resident."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


#: ONNX element types (int32, int64, bool, uint32, uint64) of tensors that may cross from one
#: chunk to the next besides the cut activations: sizes, indices, masks. No ``QuantizeLinear``
#: writes them, so no QDQ fusion of one whole-graph session (a Q -> DQ pair folded away, a
#: node unit fused into an integer kernel) can span them, and integer ops give the same integers
#: wherever they run. An 8/16/4-bit tensor that is not cut keeps its chunk open.
_EXACT_TYPES = frozenset({6, 7, 9, 12, 13})


@dataclass(frozen=True)
class VerifyRun:
    """One onnxruntime run of the per-op check (what :func:`verify`'s ``observe`` receives).

    ``kind`` is ``"free"`` (the chunk fed with onnxruntime's own values, as deployed) or
    ``"forced"`` (fed with the reference's codes); ``inputs``/``outputs`` count the tensors fed
    and fetched; ``held`` counts the tensors kept between runs after this one (reference codes
    and onnxruntime values that later chunks still read or compare), the working set the chunk
    bound limits.
    """

    kind: str
    chunk: int
    inputs: int
    outputs: int
    held: int


@dataclass(frozen=True)
class _Chunk:
    """A run of consecutive ONNX nodes checked in one onnxruntime session per mode."""

    nodes: tuple[int, ...]        # indices into graph.node, in graph order
    constants: tuple[int, ...]    # Constant nodes of earlier chunks whose outputs are read here
    produced: tuple[str, ...]     # cut tensors written here
    read: tuple[str, ...]         # cut tensors read here (written here or earlier)
    carry_in: tuple[str, ...]     # other tensors written by earlier chunks, read here
    carry_out: tuple[str, ...]    # other tensors written here, read by later chunks
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]


def _node_inputs(node: Any) -> list[str]:
    """Every tensor a node reads, including the outer names its subgraphs (If/Loop) read."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                names.extend(_node_inputs(inner))
    return names


def _plan(graph: Any, cut: Sequence[str], exact: set[str], chunk: int | None) -> tuple[_Chunk, ...]:
    """Split ``graph``'s nodes (topologically ordered, as ONNX requires) into chunks.

    A chunk closes after a node once it writes at least ``chunk`` cut tensors and every tensor
    that is neither cut, a constant, an initializer nor a graph input and is still read later is
    in ``exact`` (int32/int64 shape arithmetic, indices; see :data:`_EXACT_TYPES`). So no float
    or quantized tensor other than a cut one crosses a chunk boundary, and every fusion
    onnxruntime does (float islands, QDQ node units) is done as in one whole-graph session; the
    cut tensors, which cross, are graph outputs (free run) or graph inputs (teacher-forced run)
    of the whole-graph check anyway. ``chunk=None``: one chunk.
    """
    nodes = list(graph.node)
    cut_set = set(cut)
    fixed = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    graph_inputs = {i.name for i in graph.input} - fixed
    constant_nodes = {i for i, n in enumerate(nodes)
                      if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and not n.input}
    producer: dict[str, int] = {}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in _node_inputs(node):
            readers.setdefault(name, []).append(i)
        for name in node.output:
            if name:
                producer[name] = i
    last_use = {name: at[-1] for name, at in readers.items()}
    constants = {n for i in constant_nodes for n in nodes[i].output}
    groups: list[list[int]] = [[]]
    written, live = 0, set()
    for i, node in enumerate(nodes):
        groups[-1].append(i)
        for name in node.output:
            if name in cut_set:
                written += 1
            elif name and name not in constants and last_use.get(name, -1) > i:
                live.add(name)
        live = {n for n in live if last_use[n] > i}
        if chunk is not None and written >= chunk and live <= exact and i + 1 < len(nodes):
            groups.append([])
            written = 0
    where = {i: g for g, members in enumerate(groups) for i in members}
    chunks = []
    outputs = [o.name for o in graph.output]
    for g, members in enumerate(groups):
        inside = set(members)
        read: list[str] = []
        carry_in: list[str] = []
        used_constants: list[int] = []
        used_inputs: list[str] = []
        for i in members:
            for name in _node_inputs(nodes[i]):
                if name in cut_set:
                    read.append(name)
                elif name in graph_inputs:
                    used_inputs.append(name)
                elif name in fixed or name not in producer or producer[name] in inside:
                    continue
                elif producer[name] in constant_nodes:
                    used_constants.append(producer[name])
                else:
                    carry_in.append(name)
        produced = [n for i in members for n in nodes[i].output if n in cut_set]
        carry_out = [n for i in members for n in nodes[i].output
                     if n and n not in cut_set and n not in constants
                     and any(where[j] > g for j in readers.get(n, ()))]
        chunks.append(_Chunk(
            nodes=tuple(members), constants=tuple(dict.fromkeys(used_constants)),
            produced=tuple(produced), read=tuple(dict.fromkeys(read)),
            carry_in=tuple(dict.fromkeys(carry_in)), carry_out=tuple(carry_out),
            graph_inputs=tuple(dict.fromkeys(used_inputs)),
            graph_outputs=tuple(o for o in outputs if producer.get(o, -1) in inside)))
    return tuple(chunks)


def _layer_unit(module: Any) -> np.ndarray:
    """``in_scale * w_scale[c] * sum_k |w[c, k]|`` per output channel."""
    w = module.weight.detach().to(torch.float64).abs().reshape(module.weight.shape[0], -1)
    scale = module.in_scale * module.w_scale.detach().to(torch.float64).reshape(-1)
    return (scale * w.sum(dim=1)).numpy()


def _as_int64(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    return (codes.astype(np.int64) if isinstance(codes, np.ndarray)
            else codes.to(torch.int64).numpy())


def _compact(codes: torch.Tensor, dtype: Any) -> torch.Tensor | np.ndarray:
    """The reference's codes in the ONNX tensor's own integer type (uint8 for most activations,
    not the reference's int64: 8x less to hold until the last chunk that reads them), where
    every code fits it exactly; else unchanged, so a difference is still measured on the
    reference's own values."""
    info = np.iinfo(dtype)
    if codes.numel() and (int(codes.min()) < info.min or int(codes.max()) > info.max):
        return codes
    return codes.to(torch.int64).numpy().astype(dtype)


def _code_diff(ref: torch.Tensor | np.ndarray, got: np.ndarray) -> tuple[int, float]:
    """Max code difference and the fraction of codes that differ."""
    diff = np.abs(_as_int64(ref) - got.astype(np.int64))
    return int(diff.max(initial=0)), float((diff > 0).mean()) if diff.size else 0.0


def _compare(ref: torch.Tensor, got: np.ndarray) -> dict[str, float]:
    r = ref.detach().to(torch.float64).numpy()
    diff = np.abs(r - got.astype(np.float64)) if r.size else np.zeros(1)
    return {"max_abs_diff": float(diff.max(initial=0.0))}


def _output_report(gm: fx.GraphModule, ref: torch.Tensor, got: np.ndarray,
                   producer: fx.Node | None) -> dict[str, Any]:
    report: dict[str, Any] = _compare(ref, got)
    if not ref.is_floating_point():
        report["kind"], report["max_lsb"] = "int", int(round(report["max_abs_diff"]))
        return report
    report["kind"] = "float"
    module = gm.get_submodule(str(producer.target)) if (
        producer is not None and producer.op == "call_module") else None
    if isinstance(module, (im.IntConv2d, im.IntLinear)) and module.out_scale is None:
        unit = _layer_unit(module)
        diff = np.abs(ref.double().numpy() - got.astype(np.float64))
        shape = [1] * diff.ndim
        shape[-1 if isinstance(module, im.IntLinear) else 1] = -1  # linear: channels last
        ratio = diff / np.maximum(unit, 1e-30).reshape(shape)
        report["max_unit_ratio"] = float(ratio.max(initial=0.0))
    return report


def _chunk_model(model: Any, chunk: _Chunk, infos: dict[str, Any], types: dict[str, int],
                 initializers: dict[str, tuple[bool, Any]], forced: bool) -> Any:
    """The ONNX model of one chunk.

    Free (``forced=False``): the chunk's nodes read the cut tensors and carries of earlier chunks
    as graph inputs (fed with onnxruntime's own values) and output the cut tensors they write,
    like the whole graph with every cut tensor added as an output. Teacher-forced: every cut
    tensor the chunk reads is a graph input fed with the reference's codes, and the op that wrote
    a cut tensor ``t`` now writes ``t + "__ort"``, a graph output, so each op runs on exactly the
    reference's input codes and its output shows that op's own disagreement, free of the flips
    propagated from earlier ops.
    """
    from onnx import ModelProto, helper

    graph = model.graph
    sub = ModelProto()
    sub.ir_version = model.ir_version
    sub.opset_import.extend(model.opset_import)
    sub.functions.extend(model.functions)
    out = sub.graph
    out.name = graph.name
    produced = set(chunk.produced)
    names: set[str] = set()
    for i in chunk.constants + chunk.nodes:
        node = out.node.add()
        node.CopyFrom(graph.node[i])
        names.update(_node_inputs(node))
        if forced:
            for k, name in enumerate(node.output):
                if name in produced:
                    node.output[k] = f"{name}__ort"
    for name in sorted(names & initializers.keys()):
        sparse, proto = initializers[name]
        (out.sparse_initializer if sparse else out.initializer).add().CopyFrom(proto)
    given = {i.name: i for i in graph.input}
    out.input.extend(given[n] for n in chunk.graph_inputs)
    if forced:  # typed, no shape: as fed to the whole cut graph
        out.input.extend(helper.make_tensor_value_info(n, types[n], None) for n in chunk.read)
    else:  # type and shape as shape inference gives them inside the whole graph
        out.input.extend(infos[n] for n in chunk.read if n not in produced)
    out.input.extend(infos[n] for n in chunk.carry_in)
    if not forced:
        results = {o.name: o for o in graph.output}
        out.output.extend(results[n] for n in chunk.graph_outputs)
    out.output.extend(helper.make_tensor_value_info(f"{n}__ort" if forced else n, types[n], None)
                      for n in chunk.produced)
    out.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in chunk.carry_out)
    inside = {o for i in chunk.nodes for o in graph.node[i].output}
    out.value_info.extend(v for v in graph.value_info if v.name in inside)
    return sub


def _load(path: str | Path) -> Any:
    import onnx

    return onnx.load(str(path))


#: Initializers with more elements than this are handed to shape inference as typed, shaped
#: graph inputs (no values): weights, whose values no output type or shape depends on.
_SHAPE_ONLY = 4096


def _value_infos(model: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """Shape inference's value info (type and shape) of every intermediate tensor, and their
    element types.

    Inference runs on a copy of ``model`` without the payload of its large initializers (each
    becomes a graph input of the same type and shape), so no second copy of the weights is made;
    small ones (shapes, axes, scales) keep their values, which a ``Reshape``'s output shape
    needs.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    out = light.graph
    out.node.extend(graph.node)
    out.input.extend(graph.input)
    out.output.extend(graph.output)
    out.value_info.extend(graph.value_info)
    out.sparse_initializer.extend(graph.sparse_initializer)
    given = {i.name for i in graph.input}
    for t in graph.initializer:
        if int(np.prod(t.dims)) <= _SHAPE_ONLY:
            out.initializer.add().CopyFrom(t)
        elif t.name not in given:
            out.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inferred = onnx.shape_inference.infer_shapes(light)
    infos = {}
    for vi in inferred.graph.value_info:
        infos[vi.name] = onnx.ValueInfoProto()
        infos[vi.name].CopyFrom(vi)
    return infos, {n: vi.type.tensor_type.elem_type for n, vi in infos.items()}


def _initializers(graph: Any) -> dict[str, tuple[bool, Any]]:
    """Each initializer by name: ``(sparse, proto)``."""
    found: dict[str, tuple[bool, Any]] = {t.name: (False, t) for t in graph.initializer}
    found.update({s.values.name: (True, s) for s in graph.sparse_initializer})
    return found


class _ChunkCheck:
    """Runs the chunks in order as the reference hands over its codes (:meth:`take`), keeping
    each code and onnxruntime value only until the last chunk that reads or compares it."""

    def __init__(self, model: Any, chunks: tuple[_Chunk, ...], infos: dict[str, Any],
                 types: dict[str, int], feeds: dict[str, np.ndarray], per_op_check: bool,
                 observe: Callable[[VerifyRun], None] | None) -> None:
        self.model, self.chunks, self.infos, self.types = model, chunks, infos, types
        self.feeds, self.per_op_check, self.observe = feeds, per_op_check, observe
        self.initializers = _initializers(model.graph)
        self.nodes: dict[str, tuple[int, float]] = {}
        self.per_op: dict[str, tuple[int, float]] = {}
        self.ref: dict[str, torch.Tensor | np.ndarray] = {}
        self.free: dict[str, np.ndarray] = {}
        self.carry: dict[str, np.ndarray] = {}
        self.next = 0
        # last chunk that needs each reference code / onnxruntime value
        self.ref_last: dict[str, int] = {}
        self.val_last: dict[str, int] = {}
        self.needs: list[set[str]] = []
        for g, c in enumerate(chunks):
            needed = set(c.produced) | (set(c.read) if per_op_check else set())
            self.needs.append(needed)
            for n in needed:
                self.ref_last[n] = g
            for n in (*c.read, *c.carry_in):
                self.val_last[n] = g

    def take(self, name: str, value: torch.Tensor) -> None:
        self.ref[name] = _compact(value, _NP_TYPES[self.types[name]])
        self._advance()

    def finish(self) -> None:
        self._advance()
        if self.next != len(self.chunks):  # pragma: no cover - a reference node never ran
            missing = sorted(self.needs[self.next] - set(self.ref))
            raise BackendError(f"verify: the reference never computed {missing[:5]}; "
                               "this is a bug of the verifier, please report it")

    def _advance(self) -> None:
        while self.next < len(self.chunks) and self.needs[self.next] <= self.ref.keys():
            self._run(self.next)
            self.next += 1

    def _run(self, g: int) -> None:
        c = self.chunks[g]
        runs = []
        if c.produced or c.carry_out:
            runs.append(("free", *self._run_mode(g, forced=False)))
            if self.per_op_check:
                runs.append(("forced", *self._run_mode(g, forced=True)))
        for store, last in ((self.ref, self.ref_last), (self.free, self.val_last),
                            (self.carry, self.val_last)):
            for name in [n for n in store if last.get(n, -1) <= g]:
                del store[name]
        if runs:
            _release()  # the chunk's sessions and model copies
        if self.observe is not None:
            held = len(self.ref) + len(self.free) + len(self.carry)
            for kind, fed, fetched in runs:
                self.observe(VerifyRun(kind, g, fed, fetched, held))

    def _run_mode(self, g: int, forced: bool) -> tuple[int, int]:
        """Run chunk ``g`` in one mode: ``(tensors fed, tensors fetched)``."""
        c = self.chunks[g]
        feeds = {n: self.feeds[n] for n in c.graph_inputs}
        if forced:
            feeds.update({n: _as_int64(self.ref[n]).astype(_NP_TYPES[self.types[n]])
                          for n in c.read})
            feeds.update({n: self.carry[n] for n in c.carry_in})
        else:
            produced = set(c.produced)
            feeds.update({n: self.free[n] for n in c.read if n not in produced})
            feeds.update({n: self.free[n] for n in c.carry_in})
        sub = _chunk_model(self.model, c, self.infos, self.types, self.initializers, forced)
        session = _session(sub)
        del sub
        fetch = [f"{n}__ort" if forced else n for n in c.produced] + list(c.carry_out)
        values = session.run(fetch, feeds)
        fed = len(feeds)
        del session, feeds
        results = self.per_op if forced else self.nodes
        for name, value in zip(c.produced, values[:len(c.produced)], strict=True):
            results[name] = _code_diff(self.ref[name], value)
            if not forced and self.val_last.get(name, -1) > g:
                self.free[name] = value
        keep = self.carry if forced else self.free
        for name, value in zip(c.carry_out, values[len(c.produced):], strict=True):
            keep[name] = value
        return fed, len(fetch)


#: Cut tensors (integer activations) each chunk writes, at least: a chunk ends only where no
#: float or quantized tensor other than a cut one crosses (:func:`_plan`). Bounds what one
#: onnxruntime run fetches and what is held between runs beyond the model's own working set.
CHUNK = 32


def verify(converted: fx.GraphModule, onnx_path: str | Path,
           example_inputs: Sequence[torch.Tensor] | torch.Tensor, *,
           per_op_check: bool = True, chunk: int | None = CHUNK,
           observe: Callable[[VerifyRun], None] | None = None) -> dict[str, Any]:
    """Run the exported file in onnxruntime (CPU) and compare it with the PyTorch reference.

    Every integer activation the file computes (an ONNX integer tensor named like the fx node
    whose integer tensor it holds) is compared with the reference's codes twice: as onnxruntime
    computes it from the inputs (``nodes``), and, with ``per_op_check``, on the reference's own
    input codes (``per_op``, the graph cut at each integer activation). Memory: the file is
    checked in chunks of consecutive nodes, one onnxruntime session per chunk and mode, while
    the reference runs once more and hands each chunk its codes as they are computed; codes and
    onnxruntime values are freed once the last chunk that reads them has run. So what is held
    beyond the model and one chunk is the activations still read later, not every intermediate
    (which a big model, vit_h_14, cannot hold). The result does not depend on ``chunk``: a chunk
    ends only where no float tensor crosses, so onnxruntime fuses every float island as in one
    session, and the cut tensors that cross are graph outputs or inputs in one session too.

    Args:
        converted: The converted model that was exported (the reference).
        onnx_path: The exported ``.onnx`` file.
        example_inputs: Float32 inputs (any batch size), one per model input.
        per_op_check: Also run every integer op of the file on the reference's own input codes,
            which isolates each op's disagreement from the flips earlier ops propagate to it.
        chunk: Integer activations written per chunk (at least; a positive int), or ``None``
            for one chunk (the whole graph in one session per mode; most memory).
        observe: Called after every chunk run with a :class:`VerifyRun` (what was fed, fetched
            and held), e.g. by a test that the chunk bound holds.

    Returns:
        ``{"outputs": [{"name", "kind", "max_abs_diff", "max_lsb" (int outputs) or
        "max_unit_ratio" (float outputs of integer layers)}, ...], "max_abs_diff",
        "last_quantized": node name of the last integer activation or None, "max_lsb": its max
        code difference, "mismatch_last", "max_lsb_any": max over all integer activations,
        "nodes": {name: max code difference}, "mismatch": {name: fraction of codes that
        differ}, "per_op", "per_op_mismatch": the same on the reference's input codes,
        "max_lsb_per_op"}``.

    Raises:
        BackendError: ``chunk`` is not a positive int or ``None``, or the number of example
            inputs is not the model's.
        MissingExtraError: ``onnx``/``onnxruntime`` is not installed (extra ``onnxruntime``).
    """
    require_onnx()
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or chunk < 1):
        raise BackendError(f"verify: chunk must be a positive int (integer activations per "
                           f"onnxruntime run) or None (one run), got {chunk!r}")
    inputs = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    session = _session(onnx_path)  # end to end, from the file: no proto held alongside
    names = [i.name for i in session.get_inputs()]
    results = [o.name for o in session.get_outputs()]
    if len(names) != len(inputs):
        raise BackendError(f"verify: {onnx_path} has {len(names)} input(s) but "
                           f"{len(inputs)} example input(s) were given; pass one per input")
    feeds = {name: x.detach().cpu().numpy().astype(np.float32)
             for name, x in zip(names, inputs, strict=True)}
    got = session.run(None, feeds)
    del session
    _release()
    kinds = _Kinds(converted)
    with torch.no_grad():
        result = kinds.run(*inputs)
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    out_node = next(n for n in converted.graph.nodes if n.op == "output")
    arg = out_node.args[0]
    producers = list(arg) if isinstance(arg, (tuple, list)) else [arg]
    reports = []
    for name, ref, value, producer in zip(results, outputs, got, producers, strict=True):
        rep = _output_report(converted, ref, value, producer if isinstance(producer, fx.Node)
                             else None)
        reports.append({"name": name, **rep})
    del result, outputs, got
    model = _load(onnx_path)
    infos, types = _value_infos(model)
    _release()
    extra = [n for n in kinds.integer if types.get(n) in _NP_TYPES]
    del kinds
    exact = {n for n, t in types.items() if t in _EXACT_TYPES}
    chunks = _plan(model.graph, extra, exact, chunk)
    check = _ChunkCheck(model, chunks, infos, types, feeds, per_op_check, observe)
    if extra:
        with torch.no_grad():
            _Streamer(converted, set(extra), check.take).run(*inputs)
        check.finish()
    nodes = {n: check.nodes[n][0] for n in extra}
    mismatch = {n: check.nodes[n][1] for n in extra}
    per_op = {n: check.per_op[n][0] for n in extra if n in check.per_op}
    per_op_mismatch = {n: check.per_op[n][1] for n in extra if n in check.per_op}
    last = extra[-1] if extra else None
    return {
        "outputs": reports,
        "max_abs_diff": max((r["max_abs_diff"] for r in reports), default=0.0),
        "last_quantized": last,
        "max_lsb": nodes[last] if last is not None else 0,
        "mismatch_last": mismatch[last] if last is not None else 0.0,
        "max_lsb_any": max(nodes.values(), default=0),
        "nodes": nodes,
        "mismatch": mismatch,
        "per_op": per_op,
        "per_op_mismatch": per_op_mismatch,
        "max_lsb_per_op": max(per_op.values(), default=0),
    }

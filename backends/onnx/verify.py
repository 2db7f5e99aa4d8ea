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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from djpq_compiler.ir import modules as im

from .export import require_onnx

__all__ = ["verify"]

#: numpy dtype of each ONNX integer element type an integer activation may be held in.
_NP_TYPES = {2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64}


class _Recorder(fx.Interpreter):
    """Runs the reference and keeps every tensor result by node name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if torch.is_tensor(result):
            self.values[n.name] = result.detach()
        return result


def _session(model: Any) -> Any:
    ort = require_onnx(runtime=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _with_intermediates(model: Any, names: list[str]) -> tuple[Any, list[str], dict[str, int]]:
    """A copy of ``model`` that also outputs the integer tensors ``names`` (those it computes),
    the names kept and their ONNX element types."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    extra = [n for n in names if types.get(n) in _NP_TYPES]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in extra)
    return copy, extra, types


def _layer_unit(module: Any) -> np.ndarray:
    """``in_scale * w_scale[c] * sum_k |w[c, k]|`` per output channel."""
    w = module.weight.detach().to(torch.float64).abs().reshape(module.weight.shape[0], -1)
    scale = module.in_scale * module.w_scale.detach().to(torch.float64).reshape(-1)
    return (scale * w.sum(dim=1)).numpy()


def _teacher_forced(model: Any, names: list[str], types: dict[str, int]) -> Any:
    """A copy of ``model`` in which every tensor of ``names`` is cut out of the graph.

    Each cut tensor ``t`` becomes a graph input (fed with the reference's codes), and the op that
    computed it now writes ``t + "__ort"``, a graph output. One run then evaluates every integer
    op on exactly the reference's input codes, so each output shows that op's own disagreement,
    free of the flips propagated from earlier ops.
    """
    from onnx import helper

    cut = set(names)
    copy = helper.make_model(helper.make_graph([], "cut", [], []))
    copy.CopyFrom(model)
    graph = copy.graph
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out in cut:
                node.output[i] = f"{out}__ort"
    graph.input.extend(helper.make_tensor_value_info(n, types[n], None) for n in names)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(f"{n}__ort", types[n], None)
                        for n in names)
    return copy


def _code_diff(ref: torch.Tensor, got: np.ndarray) -> tuple[int, float]:
    """Max code difference and the fraction of codes that differ."""
    diff = np.abs(ref.to(torch.int64).numpy() - got.astype(np.int64))
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


def verify(converted: fx.GraphModule, onnx_path: str | Path,
           example_inputs: Sequence[torch.Tensor] | torch.Tensor, *,
           per_op_check: bool = True) -> dict[str, Any]:
    """Run the exported file in onnxruntime (CPU) and compare it with the PyTorch reference.

    Args:
        converted: The converted model that was exported (the reference).
        onnx_path: The exported ``.onnx`` file.
        example_inputs: Float32 inputs (any batch size).
        per_op_check: Also run every integer op of the file on the reference's own input codes
            (the graph cut at each integer activation, see :func:`_teacher_forced`), which
            isolates each op's disagreement from the flips earlier ops propagate to it.

    Returns:
        ``{"outputs": [{"name", "kind", "max_abs_diff", "max_lsb" (int outputs) or
        "max_unit_ratio" (float outputs of integer layers)}, ...], "max_abs_diff",
        "last_quantized": node name of the last integer activation or None, "max_lsb": its max
        code difference, "max_lsb_any": max over all integer activations, "nodes": {name: max code
        difference}}``.

    Raises:
        MissingExtraError: ``onnx``/``onnxruntime`` is not installed (extra ``onnxruntime``).
    """
    onnx = require_onnx()
    inputs = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    model = onnx.load(str(onnx_path))
    feeds = {i.name: x.detach().cpu().numpy().astype(np.float32)
             for i, x in zip(model.graph.input, inputs, strict=True)}
    recorder = _Recorder(converted)
    with torch.no_grad():
        result = recorder.run(*inputs)
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    out_node = next(n for n in converted.graph.nodes if n.op == "output")
    arg = out_node.args[0]
    producers = list(arg) if isinstance(arg, (tuple, list)) else [arg]
    got = _session(model).run(None, feeds)
    reports = []
    for info, ref, value, producer in zip(model.graph.output, outputs, got, producers,
                                          strict=True):
        rep = _output_report(converted, ref, value, producer if isinstance(producer, fx.Node)
                             else None)
        reports.append({"name": info.name, **rep})
    int_names = [n for n, v in recorder.values.items() if not v.is_floating_point()]
    augmented, extra, types = _with_intermediates(model, int_names)
    nodes: dict[str, int] = {}
    mismatch: dict[str, float] = {}
    per_op: dict[str, int] = {}
    per_op_mismatch: dict[str, float] = {}
    if extra:
        values = _session(augmented).run(extra, feeds)
        for name, value in zip(extra, values, strict=True):
            nodes[name], mismatch[name] = _code_diff(recorder.values[name], value)
        if per_op_check:
            cut = _teacher_forced(model, extra, types)
            forced = dict(feeds)
            forced.update({n: recorder.values[n].to(torch.int64).numpy().astype(_NP_TYPES[types[n]])
                           for n in extra})
            values = _session(cut).run([f"{n}__ort" for n in extra], forced)
            for name, value in zip(extra, values, strict=True):
                per_op[name], per_op_mismatch[name] = _code_diff(recorder.values[name], value)
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

"""Teacher-forced per-op check of a TVM build: the TVM counterpart of ONNX's per-op invariant.

A float island (``Dequantize`` -> float ops -> ``Quantize``) runs TVM's float math (its own
``exp``/``erf``/``sqrt``, its own summation order), a few float32 ulps from PyTorch's, so the
island's ``Quantize`` may flip a value sitting on a rounding tie by one LSB; in a deep net of
chained islands such flips then travel (and can grow) downstream. To tell that propagation apart
from a defect, :func:`verify_per_op` builds a *probe* of the converted model in which every
``Quantize`` is cut out of the graph:

* its consumers read a new graph input fed with the reference executor's own codes of that
  ``Quantize`` (through ``Quantize(scale=1)``, exact on integer-valued float32);
* the original ``Quantize`` still runs (on TVM's island, itself computed from reference codes)
  and is a graph output, as is every other integer-valued node.

One run then evaluates every island and every integer op on exactly the reference's inputs. The
invariant: every integer op (every integer-valued node but a ``Quantize``) is **bit-exact**,
every ``Quantize`` (an island's output) is within **1 LSB**, and a float output within float32
rounding (``rtol``). If it holds, any end-to-end difference of the real build is propagation of
those per-island flips, nothing else. This module reaches TVM only through ``build``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im

__all__ = ["PerOpReport", "teacher_forced_probe", "verify_per_op"]

#: Relative tolerance of a float output (float32 rounding of TVM's summation order).
FLOAT_OUTPUT_RTOL = 1e-5


@dataclass
class PerOpReport:
    """What :func:`verify_per_op` found, over every input.

    Attributes:
        integer_ops: Integer-valued nodes compared (``Quantize`` nodes excluded).
        integer_diffs: ``{node name: max code difference}`` of integer ops that differ (must be
            empty).
        quantizers: ``Quantize`` nodes compared.
        quantizer_diffs: ``{node name: (max code difference, fraction of codes that differ)}``
            of the ``Quantize`` nodes that differ (each must be <= 1 LSB).
        float_output_rel: Largest relative difference of a float graph output.
        kernels: ``{layer: kernel variant}`` of the probe's integer conv/linear layers
            (compare with the real build's ``CompiledModel.kernels``: the probe materializes
            every integer value, which could change a layer's layout, not its arithmetic).
    """

    integer_ops: int = 0
    integer_diffs: dict[str, int] = field(default_factory=dict)
    quantizers: int = 0
    quantizer_diffs: dict[str, tuple[int, float]] = field(default_factory=dict)
    float_output_rel: float = 0.0
    kernels: dict[str, str] = field(default_factory=dict)

    @property
    def max_quantizer_lsb(self) -> int:
        return max((d for d, _ in self.quantizer_diffs.values()), default=0)

    @property
    def ok(self) -> bool:
        """Integer ops bit-exact, island outputs within 1 LSB, float outputs within rtol."""
        return (not self.integer_diffs and self.max_quantizer_lsb <= 1
                and self.float_output_rel <= FLOAT_OUTPUT_RTOL)

    def summary(self) -> str:
        worst_frac = max((f for _, f in self.quantizer_diffs.values()), default=0.0)
        text = (f"teacher-forced per op: {self.integer_ops} integer ops, "
                f"{len(self.integer_diffs)} differ; {len(self.quantizer_diffs)} of "
                f"{self.quantizers} quantizers differ, max {self.max_quantizer_lsb} LSB "
                f"(<= {worst_frac:.1e} of codes)")
        if self.integer_diffs:
            first = dict(list(self.integer_diffs.items())[:3])
            text += f"; integer ops differing: {first}"
        if self.float_output_rel:
            text += f"; float output rel. {self.float_output_rel:.1e}"
        return text


def _is_quantize(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   im.Quantize)


class _Recorder(fx.Interpreter):
    """Runs the reference and keeps every integer tensor (compactly) and the outputs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if (n.op != "placeholder" and torch.is_tensor(result)
                and not result.is_floating_point() and result.dtype != torch.bool):
            self.values[n.name] = _compact(result.detach())
        return result


def _compact(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return t
    lo, hi = int(t.min()), int(t.max())
    for dtype in (torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return t.to(dtype)
    return t


def _integer_nodes(gm: fx.GraphModule, x: Sequence[torch.Tensor]) -> list[str]:
    recorder = _Recorder(gm)
    recorder.run(*x)
    return list(recorder.values)


def teacher_forced_probe(converted: fx.GraphModule, integer_nodes: Sequence[str]
                         ) -> tuple[fx.GraphModule, list[str], list[str]]:
    """The probe of the module docstring.

    Args:
        converted: The converted model (left unchanged).
        integer_nodes: Names of its integer-valued nodes (from a reference run).

    Returns:
        ``(probe, cut, compared)``: the probe GraphModule, whose inputs are the original ones
        followed by one float32 tensor of reference codes per name of ``cut`` (the
        ``Quantize`` nodes), and whose outputs are the original output followed by the nodes
        named in ``compared``.
    """
    from ..lowering import constant_subgraphs

    probe = copy.deepcopy(converted)
    graph = probe.graph
    folded, skipped = constant_subgraphs(probe)
    constant = {n.name for n in [*folded, *skipped]}
    by_name = {n.name: n for n in graph.nodes if n.op != "get_attr" and n.name not in constant}
    quantizers = [n for n in by_name.values() if _is_quantize(probe, n)]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    cut: list[str] = []
    for i, q in enumerate(quantizers):
        module = probe.get_submodule(str(q.target))
        assert isinstance(module, im.Quantize)  # _is_quantize
        name = f"djpq_forced_{i}"
        probe.add_submodule(name, im.Quantize(1.0, module.bits, module.signed))
        with graph.inserting_before(first_op):
            ref = graph.placeholder(f"{q.name}__ref")
        with graph.inserting_after(q):
            forced = graph.call_module(name, (ref,))
        q.replace_all_uses_with(forced, delete_user_cb=lambda user, f=forced: user is not f)
        cut.append(q.name)
    compared = [n for n in integer_nodes if n in by_name]
    out = next(n for n in graph.nodes if n.op == "output")
    original = out.args[0]
    if isinstance(original, (tuple, list)):
        raise BackendError("verify_per_op checks single-output models, got "
                           f"{len(original)} outputs")
    out.args = ((original, *[by_name[n] for n in compared]),)
    graph.lint()
    probe.recompile()
    return probe, cut, compared


def _first(t: Any) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t[0]


def verify_per_op(converted: fx.GraphModule, inputs: Sequence[torch.Tensor],
                  target: str = "x86") -> PerOpReport:
    """Build the teacher-forced probe for ``target`` and compare it with the reference.

    Args:
        converted: The converted model (one float32 input).
        inputs: Input tensors to check, each run separately (same shape; the first fixes the
            build's static shapes).
        target: A TVM target this host runs (``"x86"`` here).

    Returns:
        The :class:`PerOpReport` over every input.

    Raises:
        BackendError: The model has more than one input, or the probe does not build.
    """
    from . import build

    placeholders = [n for n in converted.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise BackendError("verify_per_op checks single-input models, got "
                           f"{len(placeholders)} inputs")
    recorder = _Recorder(converted)
    want = _first(recorder.run(inputs[0]))
    probe, cut, compared = teacher_forced_probe(converted, list(recorder.values))
    forced = [recorder.values[n].to(torch.float32) for n in cut]
    compiled = build(probe, target, example_inputs=[inputs[0], *forced])
    cut_set = set(cut)
    report = PerOpReport(integer_ops=len(compared) - len(cut_set & set(compared)),
                         quantizers=len(cut),
                         kernels={k.layer: k.variant for k in compiled.kernels})
    for index, x in enumerate(inputs):
        if index:
            recorder = _Recorder(converted)
            want = _first(recorder.run(x))
            forced = [recorder.values[n].to(torch.float32) for n in cut]
        got = compiled(x, *forced)
        _compare_output(report, got[0], want)
        for name, value in zip(compared, got[1:], strict=True):
            ref = recorder.values[name].to(torch.int64)
            diff = (value.to(torch.int64) - ref).abs()
            worst = int(diff.max()) if diff.numel() else 0
            if not worst:
                continue
            if name in cut_set:
                frac = float((diff > 0).double().mean())
                old = report.quantizer_diffs.get(name, (0, 0.0))
                report.quantizer_diffs[name] = (max(old[0], worst), max(old[1], frac))
            else:
                report.integer_diffs[name] = max(report.integer_diffs.get(name, 0), worst)
    return report


def _compare_output(report: PerOpReport, got: torch.Tensor, want: torch.Tensor) -> None:
    if not want.is_floating_point() or not want.numel():
        return  # an integer output is a compared integer node already
    diff = float((got.double() - want.double()).abs().max())
    scale = max(1.0, float(want.abs().max()))
    report.float_output_rel = max(report.float_output_rel, diff / scale)

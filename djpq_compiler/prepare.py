"""``prepare()``: a model -> a trainable DJPQ ``GraphModule`` with VIB gates and DQ quantizers.

Pipeline (one flat list of passes run by :class:`~djpq_compiler.passes.pipeline.PassRunner`,
which lints, recompiles and checks the graph after each)::

    capture -> dependency_analysis (config.ignore / prune=False layers are barriers)
            -> insert_gates (config.prune) -> record_shapes -> insert_quantizers
            -> calibrate_pass -> record_shapes

The passes hand each other their records as return values; the result carries one
:class:`~djpq_compiler.records.PreparedRecord` (read it with
:func:`~djpq_compiler.records.prepared_record`) with the config, capture facts, groups, gate and
quantizer paths and one :class:`~djpq_compiler.prepared.PreparedLayer` per layer.

Calibration [choice]: the quantizers observe ``calibration_data`` (at most
``config.calibration_batches`` batches; default: the example inputs once) with the model in eval
mode and gates at their initial (open) value; each ``q_max`` is set from the observed range and
``d`` from the initial bit-width. Activation quantizers whose signedness the graph could not prove
become unsigned when every observed value is ``>= 0`` (so the calibration data must be
representative; an explicit ``QuantSpec.signed`` avoids the guess).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from djpq_compiler import prepared_bops as _prepared_bops  # noqa: F401  (bops row source)
from djpq_compiler.config import DJPQConfig, ResolvedLayerConfig
from djpq_compiler.errors import ConfigError, UnsupportedOpError
from djpq_compiler.layers import Layer, find_layers
from djpq_compiler.modules.gates import VIBGate, attach_step_hook
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.modules.saved import attach_compact_saving
from djpq_compiler.passes.capture import (
    as_input_tuple,
    capture,
    check_finite_inputs,
    propagate_shapes,
)
from djpq_compiler.passes.dependency import ChannelGroup, Member, dependency_analysis
from djpq_compiler.passes.insert_gates import insert_gates
from djpq_compiler.passes.insert_quantizers import insert_quantizers
from djpq_compiler.passes.pipeline import PassRunner
from djpq_compiler.prepared import PreparedLayer, quantizers
from djpq_compiler.records import (
    PreparedRecord,
    QuantizerPaths,
    converted_record,
    prepared_record,
    stage,
    store,
)

__all__ = ["prepare", "calibrate"]

#: Functional layers resolve config overrides as the equivalent module type.
_FUNCTION_TYPES: dict[object, type[nn.Module]] = {
    F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d, F.linear: nn.Linear,
    F.conv_transpose1d: nn.ConvTranspose1d, F.conv_transpose2d: nn.ConvTranspose2d,
    F.conv_transpose3d: nn.ConvTranspose3d,
}


def prepare(model: nn.Module, example_inputs: Any, config: DJPQConfig | None = None, *,
            calibration_data: Iterable[Any] | None = None,
            leaf_modules: Sequence[type[nn.Module]] = (),
            concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` and insert VIB gates and DQ quantizers (see the module docstring).

    Args:
        model: A float ``nn.Module`` (never modified; a deep copy is traced).
        example_inputs: A tensor or tuple of forward arguments (shapes fix the BOPs).
        config: :class:`~djpq_compiler.config.DJPQConfig` (default: prune and quantize, 8 bit).
        calibration_data: Batches of forward arguments (each like ``example_inputs``) for the
            observers; default: ``example_inputs``.
        leaf_modules: Module classes kept opaque by the tracer (not traced into: e.g. a block
            with data-dependent control flow); they stay float and their channels are barriers.
        concrete_args: Forward arguments fixed at trace time (``torch.fx`` ``concrete_args``).

    Returns:
        A ``GraphModule`` carrying a ``PreparedRecord`` (``stage(gm) == "prepared"``), in the
        train/eval mode of ``model``; gates open, quantizers calibrated.

    Raises:
        ConfigError: ``model`` is already prepared, ``config`` is not a ``DJPQConfig``, or an
            override/ignore name matches no module.
        CaptureError: the model cannot be traced or does not run on ``example_inputs``.
        UnsupportedOpError: a conv/linear module is called more than once (shared weights)
            and is not in ``DJPQConfig.ignore``.
    """
    config = DJPQConfig() if config is None else config
    if not isinstance(config, DJPQConfig):
        raise ConfigError(f"prepare(): config must be a DJPQConfig, got {type(config).__name__}")
    _check_not_prepared(model)
    inputs = as_input_tuple(example_inputs)
    check_finite_inputs(example_inputs)  # named as the caller passed them
    run = PassRunner("prepare")
    captured = run(capture, model, inputs, leaf_modules=tuple(leaf_modules),
                   concrete_args=concrete_args)
    gm = captured.graph_module
    layers = find_layers(gm)
    config.check_names([n for n, _ in model.named_modules() if n] +
                       [la.node.name for la in layers if la.weight_source == "functional"])
    resolved = _resolve(gm, config, layers)
    _check_unshared(layers, resolved)
    analysis = run(dependency_analysis, gm, strict=config.strict,
                   ignore=_frozen_names(gm, config, resolved)).record
    sources = {la.node.name: _input_name(la) for la in layers}
    gates: dict[int, str] = {}
    if config.prune:
        gates = run(insert_gates, gm, analysis.groups, config.gate).record
        attach_step_hook(gm)
        run(record_shapes, gm, inputs)  # gate nodes get shapes: later passes see tensors
    paths = run(insert_quantizers, gm, config, layers, resolved).record
    attach_compact_saving(gm)  # quantized activations / gate outputs saved compactly, exactly
    batches = [inputs] if calibration_data is None else _finite_batches(itertools.islice(
        calibration_data, config.calibration_batches))
    run(calibrate_pass, gm, batches, paths.auto_signed)
    run(record_shapes, gm, inputs)
    store(gm, PreparedRecord(config=config, capture=captured.record, analysis=analysis,
                             gates=gates, quantizers=paths,
                             layers=_records(gm, layers, sources, analysis.groups, paths,
                                             resolved)))
    return gm


def record_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> PassResult:
    """Pass form of :func:`~djpq_compiler.passes.capture.propagate_shapes`."""
    propagate_shapes(gm, inputs)
    return PassResult(gm, False)


def calibrate_pass(gm: fx.GraphModule, batches: Iterable[Any],
                   auto_signed: Sequence[str]) -> PassResult:
    """Pass form of :func:`calibrate` (the graph is unchanged, the quantizers observe)."""
    calibrate(gm, batches, auto_signed=auto_signed)
    return PassResult(gm, False)


def _finite_batches(batches: Iterable[Any]) -> Iterator[Any]:
    for i, batch in enumerate(batches):
        check_finite_inputs(batch, f"calibration_data batch {i}")
        yield batch


def _check_not_prepared(model: nn.Module) -> None:
    now = stage(model) if isinstance(model, fx.GraphModule) else None
    if now == "converted" and converted_record(model).integer is False:
        pass  # a pruned float model (convert(p, integer=False)): e.g. two-stage VIB, then DQ
    elif now == "converted":
        raise ConfigError("prepare(): the model is already converted to integers; pass the "
                          "original float model, or the pruned float model "
                          "convert(prepared, integer=False) for a second training stage")
    elif now is not None:
        raise ConfigError(f"prepare(): the model is already {now}; pass the original float "
                          "model (prepare it once, then train, then convert)")
    for name, mod in model.named_modules():
        if isinstance(mod, (VIBGate, DQQuantizer)):
            raise ConfigError(f"prepare(): the model already contains a DJPQ {type(mod).__name__}"
                              f" at '{name}'; pass the original float model")


def _layer_type(gm: fx.GraphModule, layer: Layer) -> tuple[str, type]:
    if layer.weight_source == "module":
        return str(layer.node.target), type(gm.get_submodule(str(layer.node.target)))
    return layer.node.name, _FUNCTION_TYPES.get(layer.node.target, type(None))


def _resolve(gm: fx.GraphModule, config: DJPQConfig,
             layers: list[Layer]) -> dict[str, ResolvedLayerConfig]:
    """``{layer node name: resolved config}``; the first and last layers are flagged."""
    out = {}
    for i, layer in enumerate(layers):
        name, kind = _layer_type(gm, layer)
        out[layer.node.name] = config.resolve(name, kind, first_or_last=i in (0, len(layers) - 1))
    return out


def _check_unshared(layers: Sequence[Layer],
                    resolved: Mapping[str, ResolvedLayerConfig]) -> None:
    """Refuse a conv/linear module called at several nodes (weights shared between calls).

    Each call would get its own gate, bit-width and integer weights while the float weights are
    one tensor, so the compressed model could not be the trained one; an ignored module stays
    float at every call and is fine.
    """
    calls: dict[str, list[str]] = {}
    for layer in layers:
        if layer.weight_source == "module" and not resolved[layer.node.name].ignored:
            calls.setdefault(str(layer.node.target), []).append(layer.node.name)
    for target, nodes in calls.items():
        if len(nodes) > 1:
            raise UnsupportedOpError(
                f"prepare(): module '{target}' is called at {len(nodes)} nodes "
                f"({', '.join(nodes)}): its weights are shared between the calls, but DJPQ gives "
                "every layer its own gates, bit-width and integer weights. Give each call its "
                "own module (copy.deepcopy), or keep it float with "
                f"DJPQConfig(ignore=('{target}',))")


def _frozen_names(gm: fx.GraphModule, config: DJPQConfig,
                  resolved: Mapping[str, ResolvedLayerConfig]) -> set[str]:
    """Node/module names whose output channels must not be pruned (ignored or prune=False)."""
    frozen = {node for node, r in resolved.items() if r.ignored or not r.prune}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            if config.resolve(target, type(gm.get_submodule(target))).ignored:
                frozen.add(target)
    return frozen


def _input_name(layer: Layer) -> str | None:
    x = layer.node.args[0] if layer.node.args else layer.node.kwargs.get("input")
    return x.name if isinstance(x, fx.Node) else None


def _find_member(by_node: Mapping[str, tuple[ChannelGroup, Member]], node: str | None,
                 channels: int) -> tuple[int | None, tuple[int, ...] | None, int | None]:
    hit = by_node.get(node) if node is not None else None
    if hit is None or len(hit[1].index) != channels:
        return None, None, None
    group, member = hit
    return group.id, member.index, group.size


def _records(gm: fx.GraphModule, layers: list[Layer], sources: Mapping[str, str | None],
             groups: tuple[ChannelGroup, ...], paths: QuantizerPaths,
             resolved: Mapping[str, ResolvedLayerConfig]) -> tuple[PreparedLayer, ...]:
    by_node = {m.node: (g, m) for g in groups for m in g.members}
    nodes = {n.name: n for n in gm.graph.nodes}
    weight_q, input_q = paths.weight, paths.input
    records = []
    for la in layers:
        name = la.node.name
        src = sources[name]
        og, oi, osz = _find_member(by_node, name, la.out_channels)
        ig, ii, isz = _find_member(by_node, src, la.in_channels)
        records.append(PreparedLayer(
            name=la.name, node=name, kind=la.kind, kernel_positions=la.kernel * la.positions,
            groups=la.groups, in_channels=la.in_channels, out_channels=la.out_channels,
            weight_quantizer=weight_q.get(name), input_quantizer=input_q.get(name),
            network_input=src is not None and nodes[src].op == "placeholder",
            out_group=og, out_index=oi, in_group=ig, in_index=ii, out_group_size=osz,
            in_group_size=isz, gamma_scale=resolved[name].gamma_scale))
    return tuple(records)


def calibrate(gm: fx.GraphModule, batches: Iterable[Any], *,
              auto_signed: Sequence[str] | None = None) -> None:
    """Observe ``batches`` (forward arguments) in eval mode and set every quantizer's range.

    Quantizers in ``auto_signed`` (default: ``QuantizerPaths.auto_signed`` of a prepared model)
    become unsigned when all observed values are ``>= 0``. The module's train/eval mode is
    restored.

    Raises:
        QuantizationError: a quantizer observed nothing (no batches) or a non-finite range.
    """
    qs = [q for _, q in quantizers(gm)]
    if not qs:
        return
    if auto_signed is None:
        auto_signed = prepared_record(gm).quantizers.auto_signed
    was_training = gm.training
    gm.eval()
    try:
        for q in qs:
            q.start_calibration()
        with torch.no_grad():
            for batch in batches:
                gm(*as_input_tuple(batch))
        for path in auto_signed:
            auto = gm.get_submodule(path)
            if isinstance(auto, DQQuantizer) and auto.obs_count and bool((auto.obs_min >= 0).all()):
                auto.signed = False
        for q in qs:
            q.finish_calibration()
    finally:
        gm.train(was_training)

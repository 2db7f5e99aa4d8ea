"""``convert(prepared)``: fold, physically prune, integerize — one exact step.

Pipeline (one flat list of passes run by :class:`~djpq_compiler.passes.pipeline.PassRunner`,
which lints, recompiles and checks the graph after each and names the pass on failure):
``fold_gates`` (kept atoms per group, ``mu`` per gate point) -> ``strip_weight_quantizers``
(snapped weight grids, float weights back) -> ``prune_graph`` (channels removed from every
member of each group) -> ``drop_inference_noops`` (stochastic depth) -> ``fold_scales`` (``mu``
into norms; into layers only for float output) -> ``fold_shape_code`` -> ``to_integer``
(integer modules) or, with ``integer=False``, ``drop_activation_quantizers`` and ``fuse_bn``.
Each pass's record (keep sets, gate factors, weight grids, layer factors) is an argument of the
next; the result carries one :class:`~djpq_compiler.records.ConvertedRecord` (read it with
:func:`~djpq_compiler.records.converted_record`) and is a
:class:`~djpq_compiler.serialize.ConvertedGraphModule` (its pickle keeps ``meta``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, cast

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from djpq_compiler.bops import BopsReport, BopsRow, register_row_source
from djpq_compiler.errors import ConfigError, FloatOpsWarning
from djpq_compiler.modules.gates import detach_step_hook
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.modules.saved import detach_compact_saving
from djpq_compiler.passes.dependency.groups import ChannelGroup, atom_mask
from djpq_compiler.passes.drop_inference_noops import drop_inference_noops
from djpq_compiler.passes.fold_gates import fold_gates
from djpq_compiler.passes.fold_scales import fold_scales
from djpq_compiler.passes.fold_shape_code import fold_shape_code
from djpq_compiler.passes.pipeline import PassRunner, check_no_training_modules
from djpq_compiler.passes.prune import prune_graph
from djpq_compiler.passes.strip_weight_quantizers import strip_weight_quantizers
from djpq_compiler.passes.to_integer import IntegerLowering, to_integer
from djpq_compiler.prepared import PreparedLayer, check_finite, unwrap
from djpq_compiler.records import (
    ConvertedRecord,
    PreparedRecord,
    converted_record,
    prepared_record,
    stage,
    store,
)
from djpq_compiler.serialize import as_converted

__all__ = ["convert"]


def slice_scales(groups: tuple[ChannelGroup, ...], keep: dict[int, list[int]],
                 scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gate factors cut down to the kept channels of each gate point (a new dict)."""
    out = dict(scales)
    for group in groups:
        if group.id not in keep:
            continue
        mask = atom_mask(group, keep[group.id])
        for member in group.members:
            if member.node in out:
                elem = torch.from_numpy(mask[np.asarray(member.index, dtype=np.int64)])
                out[member.node] = out[member.node][elem]
    return out


def drop_activation_quantizers(gm: fx.GraphModule) -> PassResult:
    """Float convert: every activation quantizer node is removed (its users read its input)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   DQQuantizer):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return PassResult(gm, True)


def fuse_bn(gm: fx.GraphModule) -> PassResult:
    """Fuse eval BatchNorm into the conv/linear it directly follows (sole user); unused
    submodules (dropped quantizers, fused BNs) are deleted."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(node.args[0], fx.Node):
            continue
        bn, prev = gm.get_submodule(str(node.target)), node.args[0]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or prev.op != "call_module" \
                or len(prev.users) != 1 or bn.running_mean is None:
            continue
        layer = gm.get_submodule(str(prev.target))
        if isinstance(layer, nn.Conv2d | nn.Conv1d | nn.Conv3d) and not layer.transposed:
            fused: nn.Module = fuse_conv_bn_eval(layer, bn)
        elif isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        gm.add_submodule(str(prev.target), fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # dropped quantizers, fused BNs: not part of the model
    return PassResult(gm, True)


def _warn_float_ops(converted: fx.GraphModule) -> None:
    """A :class:`FloatOpsWarning` naming the ops an integer convert left in float."""
    names = list(converted_record(converted).float_ops)
    if not names:
        return
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    warnings.warn(FloatOpsWarning(
        f"convert(integer=True) left {len(names)} op(s) in float: {shown}. The reference "
        "executor runs them in float32 between integer layers (dequantize, op, quantize); a "
        "backend lowers them as float islands or refuses them. The list is "
        "converted_record(model).float_ops; to make them integer, quantize their inputs and "
        "outputs (an activation quantizer around them) or replace them with ops that have integer "
        "lowerings."), stacklevel=3)


def convert(prepared: nn.Module, integer: bool = True) -> fx.GraphModule:
    """Turn a trained prepared model into the deployable model.

    Args:
        prepared: The output of :func:`djpq_compiler.prepare` (possibly DDP-wrapped), trained.
        integer: ``True``: integer modules (``djpq_compiler/ir``) wherever the prepared model
            quantized activations; ``False``: the pruned float model with BN and gates folded.

    Returns:
        A new ``GraphModule`` carrying a ``ConvertedRecord`` (``stage(gm) == "converted"``);
        ``prepared`` is not modified. Channels with ``log alpha <= log tau`` are physically removed.

    Raises:
        ConfigError: ``prepared`` is not a prepared model (e.g. already converted).
        QuantizationError: NaN/Inf in a gate or quantizer, or a quantizer with no integer form.
    """
    model = unwrap(prepared)
    now = stage(model)
    if not isinstance(model, fx.GraphModule) or now != "prepared":
        hint = (" (it is already converted: convert it only once)"
                if now == "converted" else "")
        raise ConfigError(f"convert() expects a model returned by djpq_compiler.prepare(); got "
                          f"{type(model).__name__} with stage {now!r}{hint}")
    record = prepared_record(model)
    check_finite(model)
    gm: fx.GraphModule = copy.deepcopy(model)
    detach_step_hook(gm)  # training machinery of the prepared model, not part of the result
    detach_compact_saving(gm)
    gm.eval()
    run = PassRunner("convert")
    folded = run(fold_gates, gm, record.gates, round_to=record.config.round_to).record
    grid = run(strip_weight_quantizers, gm, record.quantizers.weight,
               fake_quantize=integer).record
    gate_scales = slice_scales(record.groups, folded.keep, folded.scales)
    run(prune_graph, gm, record.groups, folded.keep)
    run(drop_inference_noops, gm)
    layer_scales = run(fold_scales, gm, gate_scales, scale_layers=not integer).record
    run(fold_shape_code, gm)  # static shape reads, arithmetic and shape asserts -> constants
    if integer:
        lowered = run(to_integer, gm, grid, layer_scales)
        run.check(check_no_training_modules, lowered.graph_module)
        converted = as_converted(lowered.graph_module)
        store(converted, _converted_record(record, folded.keep, lowered.record))
        _warn_float_ops(converted)
        return converted
    run(drop_activation_quantizers, gm)
    run(fuse_bn, gm)
    run.check(check_no_training_modules, gm)
    gm.meta.clear()  # the prepared model's records: the converted one replaces them
    store(gm, _converted_record(record, folded.keep, None))
    return as_converted(gm)


def _converted_record(record: PreparedRecord, keep: dict[int, list[int]],
                      lowered: IntegerLowering | None) -> ConvertedRecord:
    """What the converted model carries: only what its consumers read."""
    common: dict[str, Any] = {"layers": record.layers, "keep": keep,
                              "source_class": record.capture.source_class,
                              "source_params": record.capture.source_params}
    if lowered is None:
        return ConvertedRecord(integer=False, **common)
    return ConvertedRecord(integer=True, float_ops=lowered.float_ops, lut_ops=lowered.lut_ops,
                           lowered_layers=lowered.lowered_layers,
                           agreement_bounds=lowered.agreement_bounds,
                           quant_map=lowered.quant_map, **common)


@register_row_source("converted")
def _converted_rows(gm: fx.GraphModule) -> BopsReport:
    """BOPs of a converted model: pruned channel counts; learned bits where the layer runs on
    integers, 32x32 where it runs in float."""
    record = converted_record(gm)
    rows = []
    for rec in record.layers:
        low = record.lowered_layers.get(rec.node)
        kept = _kept_channels(gm, rec, low)
        rows.append(BopsRow(
            name=rec.name, op=rec.kind, kernel_positions=rec.kernel_positions, groups=rec.groups,
            in_total=rec.in_channels, out_total=rec.out_channels, in_kept=kept[0],
            out_kept=kept[1], b_w=low["w_bits"] if low else 32, b_a=low["a_bits"] if low else 32))
    return BopsReport(tuple(rows), stage="converted")


def _kept_channels(gm: fx.GraphModule, rec: PreparedLayer,
                   low: dict[str, int] | None) -> tuple[int, int]:
    """(in, out) channels of a layer after pruning, read from the converted model itself."""
    if low is not None:
        return int(low["in"]), int(low["out"])
    try:
        mod = gm.get_submodule(rec.name)
    except AttributeError:  # functional layer: its weight is a get_attr, not a module
        return rec.in_channels, rec.out_channels
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    return int(cast(Any, mod).in_channels), int(cast(Any, mod).out_channels)

"""``convert(prepared)``: fold, physically prune, integerize — one exact step.

Pipeline (one flat list of passes, each linted and recompiled):
``fold_gates`` (kept atoms per group, ``mu`` per gate point) -> ``strip_weight_quantizers``
(snapped weight grids, float weights back) -> ``prune_graph`` (channels removed from every
member of each group) -> ``drop_inference_noops`` (stochastic depth) -> ``fold_scales`` (``mu``
into norms; into layers only for float output) -> ``to_integer`` (integer modules) or, with
``integer=False``, activation quantizers dropped and BN fused into its conv/linear. The result
is a :class:`~djpq_compiler.serialize.ConvertedGraphModule` (its pickle keeps ``meta``).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from djpq_compiler.bops import BopsReport, BopsRow, register_row_source
from djpq_compiler.errors import ConfigError, FloatOpsWarning
from djpq_compiler.modules.gates import detach_step_hook
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.modules.saved import detach_compact_saving
from djpq_compiler.passes.dependency.groups import ChannelGroup
from djpq_compiler.passes.drop_inference_noops import drop_inference_noops
from djpq_compiler.passes.fold_gates import fold_gates
from djpq_compiler.passes.fold_scales import fold_scales
from djpq_compiler.passes.fold_shape_code import fold_shape_code
from djpq_compiler.passes.mask import atom_mask
from djpq_compiler.passes.prune import prune_graph
from djpq_compiler.passes.strip_weight_quantizers import strip_weight_quantizers
from djpq_compiler.passes.to_integer import to_integer
from djpq_compiler.prepared import check_finite, unwrap
from djpq_compiler.serialize import as_converted

__all__ = ["convert"]


def _slice_scales(gm: fx.GraphModule) -> None:
    """Cut the recorded gate factors down to the kept channels of each gate point."""
    groups: tuple[ChannelGroup, ...] = gm.meta["djpq.groups"]
    keep: dict[int, list[int]] = gm.meta["djpq.keep"]
    scales: dict[str, torch.Tensor] = gm.meta["djpq.gate_scales"]
    for group in groups:
        if group.id not in keep:
            continue
        mask = atom_mask(group, keep[group.id])
        for member in group.members:
            if member.node in scales:
                elem = torch.from_numpy(mask[np.asarray(member.index, dtype=np.int64)])
                scales[member.node] = scales[member.node][elem]


def _drop_activation_quantizers(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   DQQuantizer):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _fuse_bn(gm: fx.GraphModule) -> None:
    """Fuse eval BatchNorm into the conv/linear it directly follows (sole user)."""
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


def _warn_float_ops(converted: fx.GraphModule) -> None:
    """A :class:`FloatOpsWarning` naming the ops an integer convert left in float."""
    names = list(converted.meta.get("djpq.float_ops", ()))
    if not names:
        return
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    warnings.warn(FloatOpsWarning(
        f"convert(integer=True) left {len(names)} op(s) in float: {shown}. The reference "
        "executor runs them in float32 between integer layers (dequantize, op, quantize); a "
        "backend lowers them as float islands or refuses them. The list is "
        "meta['djpq.float_ops']; to make them integer, quantize their inputs and outputs (an "
        "activation quantizer around them) or replace them with ops that have integer "
        "lowerings."), stacklevel=3)


def convert(prepared: nn.Module, integer: bool = True) -> fx.GraphModule:
    """Turn a trained prepared model into the deployable model.

    Args:
        prepared: The output of :func:`djpq_compiler.prepare` (possibly DDP-wrapped), trained.
        integer: ``True``: integer modules (``djpq_compiler/ir``) wherever the prepared model
            quantized activations; ``False``: the pruned float model with BN and gates folded.

    Returns:
        A new ``GraphModule`` with ``meta["djpq.stage"] == "converted"``; ``prepared`` is not
        modified. Channels with ``log alpha <= log tau`` are physically removed.

    Raises:
        ConfigError: ``prepared`` is not a prepared model (e.g. already converted).
        QuantizationError: NaN/Inf in a gate or quantizer, or a quantizer with no integer form.
    """
    model = unwrap(prepared)
    stage = model.meta.get("djpq.stage") if isinstance(model, fx.GraphModule) else None
    if not isinstance(model, fx.GraphModule) or stage != "prepared":
        hint = (" (it is already converted: convert it only once)"
                if stage == "converted" else "")
        raise ConfigError(f"convert() expects a model returned by djpq_compiler.prepare(); got "
                          f"{type(model).__name__} with stage {stage!r}{hint}")
    check_finite(model)
    gm: fx.GraphModule = copy.deepcopy(model)
    detach_step_hook(gm)  # training machinery of the prepared model, not part of the result
    detach_compact_saving(gm)
    gm.eval()
    fold_gates(gm)
    strip_weight_quantizers(gm, fake_quantize=integer)
    _slice_scales(gm)
    prune_graph(gm, gm.meta["djpq.keep"])
    drop_inference_noops(gm)
    fold_scales(gm, scale_layers=not integer)
    fold_shape_code(gm)  # static shape reads, arithmetic and shape asserts -> constants
    if integer:
        converted = as_converted(to_integer(gm))
        _warn_float_ops(converted)
        return converted
    _drop_activation_quantizers(gm)
    _fuse_bn(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # dropped quantizers, fused BNs: not part of the model
    gm.meta["djpq.stage"] = "converted"
    gm.meta["djpq.integer"] = False
    return as_converted(gm)


@register_row_source("converted")
def _converted_rows(gm: fx.GraphModule) -> BopsReport:
    """BOPs of a converted model: pruned channel counts; learned bits where the layer runs on
    integers, 32x32 where it runs in float."""
    lowered: dict[str, dict[str, int]] = gm.meta.get("djpq.lowered_layers", {})
    rows = []
    for rec in gm.meta.get("djpq.layers", ()):
        low = lowered.get(rec.node)
        kept = _kept_channels(gm, rec)
        rows.append(BopsRow(
            name=rec.name, op=rec.kind, kernel_positions=rec.kernel_positions, groups=rec.groups,
            in_total=rec.in_channels, out_total=rec.out_channels, in_kept=kept[0],
            out_kept=kept[1], b_w=low["w_bits"] if low else 32, b_a=low["a_bits"] if low else 32))
    return BopsReport(tuple(rows), stage="converted")


def _kept_channels(gm: fx.GraphModule, rec: object) -> tuple[int, int]:
    """(in, out) channels of a layer after pruning, read from the converted model itself."""
    low = gm.meta.get("djpq.lowered_layers", {}).get(rec.node)  # type: ignore[attr-defined]
    if low is not None:
        return int(low["in"]), int(low["out"])
    try:
        mod = gm.get_submodule(rec.name)  # type: ignore[attr-defined]
    except AttributeError:  # functional layer: its weight is a get_attr, not a module
        return rec.in_channels, rec.out_channels  # type: ignore[attr-defined]
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    return int(mod.in_channels), int(mod.out_channels)  # type: ignore[arg-type]

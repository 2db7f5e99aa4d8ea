"""Fold-scales pass: multiply the recorded gate factors ``mu`` into the gate points' parameters.

Requires: the gate factors (node name -> per-channel factor, ``GateFold.scales`` of
``fold_gates`` sliced to the kept channels after ``prune_graph``).
Guarantees: a norm gate point (BN/InstanceNorm) gets ``weight *= mu, bias *= mu`` (affine is
created if absent) — exact for any sign. A conv/linear gate point gets its output rows scaled
when ``scale_layers`` is True (float conversion); otherwise the factor is returned (the record:
layer node name -> factor) for integer lowering (``to_integer``), which folds it into the
per-channel requantization multiplier so the weight codes stay those the quantizer learned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from djpq_compiler.errors import QuantizationError
from djpq_compiler.layers import LAYER_FUNCTIONS
from djpq_compiler.passes.pipeline import Recorded

__all__ = ["fold_scales", "fold_layer_scale"]


def _view(scale: torch.Tensor, ref: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * ref.ndim
    shape[dim] = -1
    return scale.to(ref.dtype).view(shape)


def _fold_norm(mod: nn.modules.batchnorm._NormBase, mu: torch.Tensor) -> None:
    n = mu.numel()
    with torch.no_grad():
        if mod.weight is None:
            mod.weight = nn.Parameter(torch.ones(n))
            mod.bias = nn.Parameter(torch.zeros(n))
            mod.affine = True
        mod.weight.mul_(mu.to(mod.weight.dtype))
        mod.bias.mul_(mu.to(mod.bias.dtype))


def fold_layer_scale(mod: Any, mu: torch.Tensor) -> None:
    transposed = isinstance(mod, nn.modules.conv._ConvNd) and mod.transposed
    with torch.no_grad():
        mod.weight.mul_(_view(mu, mod.weight, 1 if transposed else 0))
        if getattr(mod, "bias", None) is not None:
            mod.bias.mul_(mu.to(mod.bias.dtype))


def _fold_functional(gm: fx.GraphModule, node: fx.Node, mu: torch.Tensor) -> None:
    """Scale the ``get_attr`` weight (and bias) of a functional conv/linear gate point."""
    transposed = "transpose" in getattr(node.target, "__name__", "")
    for i, dim in ((1, 1 if transposed else 0), (2, 0)):
        arg = node.args[i] if len(node.args) > i else None
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            owner_path, _, attr = str(arg.target).rpartition(".")
            tensor = getattr(gm.get_submodule(owner_path) if owner_path else gm, attr)
            with torch.no_grad():
                tensor.mul_(_view(mu, tensor, dim))


def fold_scales(gm: fx.GraphModule, scales: Mapping[str, torch.Tensor], *,
                scale_layers: bool) -> Recorded[dict[str, torch.Tensor]]:
    """Fold every gate factor into its gate point (see module docstring).

    Returns:
        ``Recorded(gm, layer_scales)``: the factors of conv/linear module gate points left for
        integer lowering (empty with ``scale_layers``).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    kept: dict[str, torch.Tensor] = {}
    for name, mu in scales.items():
        node = nodes[name]
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            _fold_norm(mod, mu)
        elif isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            if scale_layers:
                fold_layer_scale(mod, mu)
            else:
                kept[name] = mu
        elif node.op == "call_function" and node.target in LAYER_FUNCTIONS:
            _fold_functional(gm, node, mu)
        else:
            raise QuantizationError(f"cannot fold the gate after {node.format_node()}: only "
                                    "conv/linear modules and norms are gate points for convert()")
    return Recorded(gm, kept, bool(scales))

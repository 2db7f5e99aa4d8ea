"""Strip-weight-quantizers pass: read out each layer's weight grid, leave float weights behind.

Requires: a prepared graph and its weight quantizer paths (``QuantizerPaths.weight``: layer node
-> quantizer path).
Guarantees: every weight quantizer is snapped to its read-out bits; the returned grid maps layer
node name -> ``(d, bits)`` (step and read-out bit-width, per-tensor); module layers no
longer carry a parametrization (``weight`` is the float original) and functional weight
quantizer nodes are removed. The integer codes of any slice of the weight are then
``clamp(round(w / d), -L, L)`` with ``L = 2^(bits-1) - 1`` — what the quantizer computed.

One rounding [choice]: when the quantizer's forward already runs on its read-out grid (snapped
by ``freeze_for_deployment``/``snap_quantizers``, fixed bits, or learned bits that read out as
they are), its step and the read-out step ``q_max / levels(bits)`` agree only to a few float
ulps (``exp(log d)`` is not ``d``). Then the recorded ``d`` is the forward's own step and the
deployed weight is the quantizer's own output, so a weight within an ulp of a ``.5`` tie rounds
the same way in the fake-quant model and in the integer model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from djpq_compiler.errors import QuantizationError
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.passes.pipeline import Recorded

__all__ = ["strip_weight_quantizers"]


def _grid(path: str, quant: DQQuantizer) -> tuple[float, int]:
    if not quant.per_tensor:
        raise QuantizationError(f"weight quantizer {path} is per-channel; convert() supports "
                                "per-tensor DQ weight quantizers (QuantSpec(per_channel=False))")
    if quant.learn_t:
        raise QuantizationError(f"weight quantizer {path} learns a non-linear mapping t; it has "
                                "no integer form: prepare with learn_t=False to convert")
    quant.check_finite(path)
    snapped = quant.snapped()
    d = float(snapped.d)
    with torch.no_grad():
        forward_d = float(quant.d().detach().reshape(()))
    return (forward_d if _same_grid(forward_d, d) else d), int(snapped.bits)


#: Steps closer than this (relative) are one grid computed two ways: float ulps, not bits.
_SAME_GRID_RTOL = 1e-5


def _same_grid(forward_d: float, readout_d: float) -> bool:
    return math.isclose(forward_d, readout_d, rel_tol=_SAME_GRID_RTOL)


def _deployed(weight: torch.Tensor, quant: DQQuantizer, grid: tuple[float, int]) -> torch.Tensor:
    """``d * codes`` of ``weight``: the quantizer's own output when its forward runs on the
    read-out grid (one rounding of the same floats), else the read-out grid's rounding."""
    d, bits = grid
    with torch.no_grad():
        if _same_grid(float(quant.d().detach().reshape(())), d):
            return quant.quantize(weight.detach()).detach().clone()
        limit = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(weight / d), -limit, limit) * d


def _unparametrize(gm: fx.GraphModule, path: str, quant: DQQuantizer,
                   grid: tuple[float, int] | None) -> None:
    """Replace a parametrized module by a plain one holding the float original weight.

    ``parametrize.remove_parametrizations`` edits the dynamically created class, which a deep
    copy shares with the original module: removing it there would break the prepared model.
    """
    mod: Any = gm.get_submodule(path)
    base = type(mod).__bases__[0]
    plain: Any = object.__new__(base)
    plain.__dict__ = dict(mod.__dict__)
    plain._modules = {k: v for k, v in mod._modules.items() if k != "parametrizations"}
    plain._buffers = dict(mod._buffers)
    plain._parameters = dict(mod._parameters)
    weight = mod.parametrizations.weight.original.detach().clone()
    if grid is not None:
        weight = _deployed(weight, quant, grid)
    plain._parameters["weight"] = nn.Parameter(weight)
    owner_path, _, attr = path.rpartition(".")
    setattr(gm.get_submodule(owner_path) if owner_path else gm, attr, plain)


def _fake_quantize_attr(gm: fx.GraphModule, target: str, quant: DQQuantizer) -> None:
    """Replace a functional layer's ``get_attr`` weight by its deployed value ``d * codes``."""
    grid = _grid(target, quant)
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    weight = getattr(owner, attr)
    with torch.no_grad():
        weight.copy_(_deployed(weight, quant, grid))


def strip_weight_quantizers(gm: fx.GraphModule, weight_quantizers: Mapping[str, str], *,
                            fake_quantize: bool = False
                            ) -> Recorded[dict[str, tuple[float, int]]]:
    """Remove the weight quantizers; return ``{layer node: (d, bits)}``.

    ``weight_quantizers`` maps layer node names to quantizer paths (``QuantizerPaths.weight``).

    With ``fake_quantize`` the float weight left behind is the deployed one, ``d * codes`` (so a
    layer that ends up in a float island computes what the prepared model computed); otherwise it
    is the float original (``convert(integer=False)``: quantizers disabled).
    """
    grid: dict[str, tuple[float, int]] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer, path in weight_quantizers.items():
        quant = gm.get_submodule(path)
        if not isinstance(quant, DQQuantizer):
            continue
        grid[layer] = _grid(path, quant)
        owner = path.split(".parametrizations.")[0] if ".parametrizations." in path else None
        if owner is not None and parametrize.is_parametrized(gm.get_submodule(owner), "weight"):
            _unparametrize(gm, owner, quant, grid[layer] if fake_quantize else None)
    for node in list(nodes.values()):
        target = str(node.target)
        if node.op != "call_module" or not target.split(".")[-1].startswith("w_"):
            continue
        quant = gm.get_submodule(target)
        if isinstance(quant, DQQuantizer):
            source = node.args[0]
            if fake_quantize and isinstance(source, fx.Node) and source.op == "get_attr":
                _fake_quantize_attr(gm, str(source.target), quant)
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return Recorded(gm, grid, bool(grid))

"""The DJPQ regulariser: a differentiable, BOPs-aware coupling of gates and bit-widths.

``L = L_task + gamma * djpq_loss(prepared)`` (REFERENCE §1). Both kinds are divided by the FP32
BOPs of the unpruned model, so ``gamma`` is scale-free, and both use
:func:`djpq_compiler.bops.layer_bops` for the arithmetic (DESIGN invariant 5):

* ``"vib_bops"`` (default, the paper's reading): ``R = sum_l C_l(b) * sum_{j in out(l)}
  0.5*log(1 + alpha_lj)`` with ``C_l = k*H_out*W_out * (soft C_in_kept / groups) * b_w,l * b_a,l``
  (BOPs per output channel, continuous bits: differentiable in ``d`` and ``q_max``; soft input
  channels from the input group's ``soft_keep``).
* ``"soft_bops"``: ``R = BOPs_soft / BOPs_fp32`` with soft channel counts
  ``sum_j sigmoid((log alpha_j - log tau) / T)`` for inputs and outputs.

[choice] A layer whose output channels have no gate (unprunable group, or ``prune=False``)
counts each output channel with weight 1 in ``"vib_bops"`` (there is no VIB term to weight), so
without any gate both kinds equal the BOPs term with full channels, ``BOPs(b) / BOPs_fp32``.
Layers without a quantizer (or with it disabled) count 32 bits. A per-channel quantizer counts the
mean of its channels' bits. Depthwise convs see ``C_in / groups`` inputs per output channel.

Per-layer strength: each layer's term is multiplied by its ``gamma_scale``
(``Override(match, gamma_scale=s)``, default 1), so ``gamma * R`` weighs the matching layers'
BOPs ``s`` times as much as the others' (e.g. depthwise convs 0.5, the classifier 2). The
normalisation stays the unscaled FP32 BOPs, so with every scale 1 ``R`` is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from djpq_compiler.bops import FP32_BITS, layer_bops
from djpq_compiler.config import LOSS_KINDS
from djpq_compiler.errors import ConfigError
from djpq_compiler.modules.gates import VIBGate
from djpq_compiler.prepared import PreparedLayer, gate_of, prepared_layers, quantizer_at, unwrap
from djpq_compiler.records import prepared_record

__all__ = ["djpq_loss", "fp32_bops"]


def fp32_bops(prepared: nn.Module) -> float:
    """FP32 BOPs (32x32 bits, all channels) of the original model."""
    return float(sum(r.macs_fp for r in prepared_layers(prepared)) * FP32_BITS * FP32_BITS)


def _bits(gm: nn.Module, path: str | None) -> torch.Tensor | float:
    q = quantizer_at(gm, path)
    if q is None or not q.enabled:
        return float(FP32_BITS)
    return q.bits().mean()


def _weighted(gate: VIBGate, per_atom: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """``sum_j per_atom[atom(j)]`` over the member's channels."""
    weights = torch.tensor(counts, dtype=per_atom.dtype, device=per_atom.device)
    return (per_atom * weights).sum()


def _soft_count(gm: nn.Module, group: int | None, counts: tuple[int, ...] | None, full: int,
                temperature: float) -> torch.Tensor | float:
    gate = gate_of(gm, group)
    if gate is None or counts is None:
        return float(full)
    return _weighted(gate, gate.soft_keep(temperature), counts)


def _in_per_group(gm: nn.Module, rec: PreparedLayer, temperature: float) -> torch.Tensor | float:
    if rec.depthwise:  # each output channel always reads C_in/groups inputs
        return rec.in_channels / rec.groups
    soft = _soft_count(gm, rec.in_group, rec.in_counts, rec.in_channels, temperature)
    return soft / rec.groups


def _out_term(gm: nn.Module, rec: PreparedLayer, kind: str,
              temperature: float) -> torch.Tensor | float:
    if kind == "soft_bops":
        return _soft_count(gm, rec.out_group, rec.out_counts, rec.out_channels, temperature)
    gate = gate_of(gm, rec.out_group)
    if gate is None or rec.out_counts is None:
        return float(rec.out_channels)
    return _weighted(gate, gate.kl(), rec.out_counts)


def djpq_loss(prepared: nn.Module, kind: str | None = None, *,
              temperature: float = 1.0) -> torch.Tensor:
    """The DJPQ regulariser ``R`` of a prepared model (a scalar tensor; see the module docstring).

    Args:
        prepared: The output of :func:`djpq_compiler.prepare` (optionally wrapped in DDP).
        kind: ``"vib_bops"`` or ``"soft_bops"``; default ``config.loss_kind``.
        temperature: ``T`` of the soft keep probabilities.

    Raises:
        ConfigError: unknown ``kind``, ``temperature <= 0`` or ``prepared`` is not prepared.
    """
    gm = unwrap(prepared)
    records = prepared_layers(gm)
    kind = prepared_record(gm).config.loss_kind if kind is None else kind
    if kind not in LOSS_KINDS:
        raise ConfigError(f"djpq_loss: kind must be one of {LOSS_KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ConfigError(f"djpq_loss: temperature must be > 0, got {temperature!r}")
    param = next(gm.parameters(), None)
    total = torch.zeros((), device=param.device if param is not None else None)
    fp32 = fp32_bops(gm)
    if fp32 == 0:
        return total
    for rec in records:
        b_w, b_a = _bits(gm, rec.weight_quantizer), _bits(gm, rec.input_quantizer)
        out = _out_term(gm, rec, kind, temperature)
        in_pg = _in_per_group(gm, rec, temperature)
        term = layer_bops(rec.kernel_positions, out, in_pg, b_w, b_a)  # type: ignore[type-var]
        total = total + (term if rec.gamma_scale == 1.0 else rec.gamma_scale * term)
    return total / fp32

"""The data model of a prepared model, and the helpers that train and inspect one.

``prepare()`` records one :class:`PreparedLayer` per conv/linear layer in its
:class:`~djpq_compiler.records.PreparedRecord` (``prepared_record(gm).layers``): where its weight
and input-activation quantizers live and which channel group (and which atom of it) each of its
output and input channels belongs to. The loss, the BOPs report and ``convert`` read the model
only through these records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from djpq_compiler.errors import ConfigError
from djpq_compiler.modules.gates import VIBGate
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.records import prepared_record, stage

__all__ = [
    "PreparedLayer",
    "unwrap",
    "prepared_layers",
    "gate_of",
    "quantizer_at",
    "gates",
    "quantizers",
    "set_quantizers",
    "snap_quantizers",
    "set_gates_deterministic",
    "open_gates",
    "freeze_for_deployment",
    "param_groups",
    "check_finite",
]


def _counts(index: tuple[int, ...] | None, size: int | None) -> tuple[int, ...] | None:
    if index is None or size is None:
        return None
    return tuple(int(c) for c in np.bincount(np.asarray(index, dtype=np.int64), minlength=size))


@dataclass(frozen=True)
class PreparedLayer:
    """One conv/linear layer of a prepared model.

    Attributes:
        name: Report name (module path, or node name of a functional layer).
        node: FX node name of the layer.
        kind: ``"conv"``, ``"conv_transpose"`` or ``"linear"``.
        kernel_positions: ``k_h*k_w*H_out*W_out`` (conv) or tokens (linear).
        groups: Convolution groups.
        in_channels: Input channels of the original layer.
        out_channels: Output channels of the original layer.
        weight_quantizer: Path of its weight quantizer (``None``: float weights).
        input_quantizer: Path of the quantizer of the tensor it reads (``None``: float input).
        network_input: Whether it reads the network input.
        out_group: Channel group of its output channels (``None``: untracked).
        out_index: Atom of ``out_group`` of each output channel.
        in_group: Channel group of its input channels (``None``: untracked).
        in_index: Atom of ``in_group`` of each input channel (feature, after a flatten).
        out_group_size: Atoms of ``out_group``; ``in_group_size`` likewise.
        gamma_scale: Factor on its term of the DJPQ regulariser (``Override.gamma_scale``; 1).
    """

    name: str
    node: str
    kind: str
    kernel_positions: int
    groups: int
    in_channels: int
    out_channels: int
    weight_quantizer: str | None
    input_quantizer: str | None
    network_input: bool
    out_group: int | None
    out_index: tuple[int, ...] | None
    in_group: int | None
    in_index: tuple[int, ...] | None
    out_group_size: int | None = None
    in_group_size: int | None = None
    gamma_scale: float = 1.0
    out_counts: tuple[int, ...] | None = field(init=False, repr=False, compare=False)
    in_counts: tuple[int, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # channels per atom: kept channels = sum(keep[atom] * count[atom]), no gather needed
        object.__setattr__(self, "out_counts", _counts(self.out_index, self.out_group_size))
        object.__setattr__(self, "in_counts", _counts(self.in_index, self.in_group_size))

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def macs_fp(self) -> int:
        return self.kernel_positions * self.out_channels * (self.in_channels // self.groups)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def prepared_layers(model: nn.Module) -> tuple[PreparedLayer, ...]:
    """The layer records of a prepared model.

    Raises:
        ConfigError: ``model`` is not the output of ``prepare()``.
    """
    gm = unwrap(model)
    if not isinstance(gm, fx.GraphModule) or stage(gm) != "prepared":
        raise ConfigError(f"expected a model returned by djpq_compiler.prepare(), got "
                          f"{type(gm).__name__} (stage {stage(gm)})")
    return prepared_record(gm).layers


def gate_of(model: nn.Module, group: int | None) -> VIBGate | None:
    """The gate of channel group ``group`` (``None`` when the group is not gated)."""
    if group is None:
        return None
    gm = unwrap(model)
    paths = prepared_record(gm).gates
    if group not in paths:
        return None
    gate = gm.get_submodule(paths[group])
    return gate if isinstance(gate, VIBGate) else None


def quantizer_at(model: nn.Module, path: str | None) -> DQQuantizer | None:
    """The quantizer at submodule ``path`` (``None`` for ``None``)."""
    if path is None:
        return None
    q = unwrap(model).get_submodule(path)
    return q if isinstance(q, DQQuantizer) else None


def gates(model: nn.Module) -> Iterator[tuple[str, VIBGate]]:
    """``(path, gate)`` of every VIB gate (each once)."""
    for name, mod in unwrap(model).named_modules():
        if isinstance(mod, VIBGate):
            yield name, mod


def quantizers(model: nn.Module) -> Iterator[tuple[str, DQQuantizer]]:
    """``(path, quantizer)`` of every DQ quantizer (each once; weight ones via parametrizations)."""
    for name, mod in unwrap(model).named_modules():
        if isinstance(mod, DQQuantizer):
            yield name, mod


def set_quantizers(model: nn.Module, enabled: bool) -> None:
    """Enable or disable (identity) every quantizer."""
    for _, q in quantizers(model):
        q.enabled = bool(enabled)


def snap_quantizers(model: nn.Module) -> None:
    """Snap every quantizer to its read-out bits in place (``DQQuantizer.snap_``): the model then
    computes what ``convert`` deploys. Use it on a copy for evaluation; training continues from
    the snapped values otherwise."""
    for _, q in quantizers(model):
        q.snap_()


def set_gates_deterministic(model: nn.Module, deterministic: bool) -> None:
    """Use the hard gate ``mu * 1[log alpha > log tau]`` even in training mode (or stop)."""
    for _, g in gates(model):
        g.deterministic = bool(deterministic)


@torch.no_grad()
def open_gates(model: nn.Module) -> None:
    """Set every gate exactly open: ``mu = 1``, kept, deterministic (the gate is the identity).

    ``log sigma^2`` is lowered where needed so that ``log alpha > log tau`` holds with margin.
    """
    for _, g in gates(model):
        g.mu.fill_(1.0)
        g.log_sigma2.clamp_(max=-g.log_threshold - 1.0)
        g.deterministic = True


@torch.no_grad()
def freeze_for_deployment(model: nn.Module) -> None:
    """Fix every gate and quantizer at what ``convert`` deploys, and stop training them.

    Quantizers are snapped to their read-out bits (:func:`snap_quantizers`); gates become
    deterministic with their hard mask equal to ``deploy_mask(round_to)`` (the atoms ``convert``
    re-admits, never-empty groups and rounded counts, get ``log sigma^2`` lowered so that they
    pass the threshold); all gate and quantizer parameters get ``requires_grad=False``. The model
    then computes exactly the deployed network while its weights (and BN) keep training: the
    finalization phase of :func:`~djpq_compiler.workflows.finetune.finetune`, which lets the
    weights adapt
    to the rounded-up bit-widths instead of meeting them only at conversion.
    """
    gm = unwrap(model)
    round_to = prepared_record(gm).config.round_to if stage(gm) == "prepared" else 1
    snap_quantizers(gm)
    for _, g in gates(gm):
        mask = g.deploy_mask(round_to)
        readmit = mask & ~g.keep_mask()
        if bool(readmit.any()):
            floor = torch.log(g.mu[readmit].square() + torch.finfo(g.mu.dtype).tiny)
            g.log_sigma2[readmit] = torch.minimum(g.log_sigma2[readmit],
                                                  floor - g.log_threshold - 1.0)
        g.deterministic = True
    for m in gm.modules():
        if isinstance(m, (VIBGate, DQQuantizer)):
            for p in m.parameters():
                p.requires_grad_(False)


def param_groups(model: nn.Module, weight_lr: float, djpq_lr: float = 1e-3,
                 weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim``: model weights vs. gate/quantizer parameters.

    Gate and quantizer parameters (``mu``, ``log_sigma2``, ``log_d``, ``log_q_max``, ``log_t``)
    get ``djpq_lr`` and no weight decay (REFERENCE §1 training recipe); everything else (conv/linear
    weights including the float weights behind a quantizer parametrization, biases, BN) gets
    ``weight_lr`` and ``weight_decay``. Each group carries a ``"name"``; empty groups are omitted.
    """
    for label, value in (("weight_lr", weight_lr), ("djpq_lr", djpq_lr),
                         ("weight_decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"param_groups: {label} must be finite and >= 0, got {value!r}")
    gm = unwrap(model)
    ours = {id(p) for m in gm.modules() if isinstance(m, (VIBGate, DQQuantizer))
            for p in m.parameters()}
    params = [p for p in gm.parameters() if p.requires_grad]
    groups = [
        {"name": "weights", "params": [p for p in params if id(p) not in ours], "lr": weight_lr,
         "weight_decay": weight_decay},
        {"name": "djpq", "params": [p for p in params if id(p) in ours], "lr": djpq_lr,
         "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def check_finite(model: nn.Module) -> None:
    """Raise :class:`~djpq_compiler.errors.QuantizationError` naming the first gate or quantizer
    whose parameters are NaN/Inf (or, for a quantizer, not positive)."""
    for name, g in gates(model):
        g.check_finite(name)
    for name, q in quantizers(model):
        q.check_finite(name)


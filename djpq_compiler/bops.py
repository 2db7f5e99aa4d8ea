"""Exact bit-operation (BOPs) counting — the single implementation (DESIGN invariant 5).

BOPs of a conv: ``k_h*k_w * H_out*W_out * C_out_kept * (C_in_kept/groups) * b_w * b_a``; of a
linear: ``in_kept * out_kept * b_w * b_a`` (times tokens for a linear over ``(N, T, C)``).
``b_a`` is the bit-width of the activation *feeding* the layer. BN, activations, adds and
pooling are free.
FP32 counts 32x32 on every layer of the unpruned model. All counts are per sample.

The same :func:`layer_bops` is used for reports, the differentiable DJPQ loss (with tensors for the
soft channel counts and continuous bit-widths) and the benchmarks.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from djpq_compiler import records
from djpq_compiler.errors import ConfigError
from djpq_compiler.layers import Layer, find_layers

__all__ = ["BopsRow", "BopsReport", "bops", "layer_bops", "register_row_source", "FP32_BITS"]

FP32_BITS = 32
Num = TypeVar("Num", float, torch.Tensor)


def layer_bops(kernel_positions: int, out_kept: Num, in_per_group_kept: Num, b_w: Num,
               b_a: Num) -> Num:
    """BOPs of one conv/linear: ``kernel*positions * out_kept * in_per_group_kept * b_w * b_a``.

    Works on Python numbers and on tensors (differentiable in every argument but the first).
    """
    return kernel_positions * out_kept * in_per_group_kept * b_w * b_a


@dataclass(frozen=True)
class BopsRow:
    """One conv/linear layer's accounting.

    ``in_kept``/``out_kept`` are the channels that remain after pruning (equal to the totals for an
    unpruned layer); ``in_total``/``out_total`` those of the original model.
    """

    name: str
    op: str
    kernel_positions: int
    groups: int
    in_total: int
    out_total: int
    in_kept: float
    out_kept: float
    b_w: float
    b_a: float

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_total

    @property
    def in_per_group_kept(self) -> float:
        if self.depthwise:  # each output channel always sees in_total/groups inputs
            return self.in_total / self.groups
        return self.in_kept / self.groups

    @property
    def macs_fp(self) -> int:
        """MACs of the original (unpruned) layer."""
        return self.kernel_positions * self.out_total * (self.in_total // self.groups)

    @property
    def macs(self) -> float:
        """MACs that remain after pruning."""
        return layer_bops(self.kernel_positions, self.out_kept, self.in_per_group_kept, 1.0, 1.0)

    @property
    def bops(self) -> float:
        return layer_bops(self.kernel_positions, self.out_kept, self.in_per_group_kept,
                          self.b_w, self.b_a)

    @property
    def fp32_bops(self) -> int:
        return self.macs_fp * FP32_BITS * FP32_BITS


@dataclass(frozen=True)
class BopsReport:
    """BOPs of a model: per-layer rows plus totals, printable as a table."""

    rows: tuple[BopsRow, ...]
    stage: str = "float"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(r.bops for r in self.rows))

    @property
    def fp32_total(self) -> float:
        return float(sum(r.fp32_bops for r in self.rows))

    @property
    def macs(self) -> float:
        return float(sum(r.macs for r in self.rows))

    @property
    def gbops(self) -> float:
        return self.total / 1e9

    @property
    def ratio(self) -> float:
        """FP32 BOPs of the original model divided by these BOPs (the compression factor)."""
        return self.fp32_total / self.total if self.total else float("inf")

    def row(self, name: str) -> BopsRow:
        for r in self.rows:
            if r.name == name:
                return r
        names = [r.name for r in self.rows]
        raise KeyError(f"no conv/linear layer named {name!r}; layers: {names}")

    def table(self) -> str:
        """A fixed-width text table, one line per layer plus the totals."""
        head = f"{'layer':<32} {'op':<8} {'in':>11} {'out':>11} {'b_w':>5} {'b_a':>5} " \
               f"{'MBOPs':>11} {'share':>6}"
        lines = [f"BOPs report ({self.stage})", head, "-" * len(head)]
        total = self.total or 1.0
        for r in self.rows:
            lines.append(
                f"{r.name[:32]:<32} {r.op:<8} {_kept(r.in_kept, r.in_total):>11} "
                f"{_kept(r.out_kept, r.out_total):>11} {r.b_w:>5.1f} {r.b_a:>5.1f} "
                f"{r.bops / 1e6:>11.2f} {100 * r.bops / total:>5.1f}%"
            )
        lines.append("-" * len(head))
        lines.append(
            f"total {self.gbops:.4f} GBOPs | FP32 {self.fp32_total / 1e9:.4f} GBOPs | "
            f"{self.ratio:.1f}x fewer | MACs {self.macs / 1e6:.2f} M"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _kept(kept: float, total: int) -> str:
    return f"{total}" if kept == total else f"{kept:g}/{total}"


RowSource = Callable[[fx.GraphModule], BopsReport]
_ROW_SOURCES: dict[str, RowSource] = {}


def register_row_source(stage: str) -> Callable[[RowSource], RowSource]:
    """Register how :func:`bops` reads a model of a given stage (``records.stage(gm)``).

    Prepared and converted models know their own bit-widths and kept channels; they register a
    function that builds their report (with :class:`BopsRow`, so the arithmetic stays here).
    """

    def deco(fn: RowSource) -> RowSource:
        _ROW_SOURCES[stage] = fn
        return fn

    return deco


def row_for_layer(layer: Layer, b_w: float, b_a: float, in_kept: float | None = None,
                  out_kept: float | None = None) -> BopsRow:
    """The :class:`BopsRow` of a :class:`~djpq_compiler.layers.Layer` at given bits."""
    return BopsRow(
        name=layer.name,
        op=layer.kind,
        kernel_positions=layer.kernel * layer.positions,
        groups=layer.groups,
        in_total=layer.in_channels,
        out_total=layer.out_channels,
        in_kept=layer.in_channels if in_kept is None else in_kept,
        out_kept=layer.out_channels if out_kept is None else out_kept,
        b_w=b_w,
        b_a=b_a,
    )


def bops(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    weight_bits: float = FP32_BITS,
    act_bits: float = FP32_BITS,
    overrides: Mapping[str, tuple[float, float]] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> BopsReport:
    """Count BOPs of a model at any stage.

    Args:
        model: A plain ``nn.Module`` (captured with ``example_inputs``), or a prepared / converted
            ``GraphModule`` (bits and kept channels are read from the model; other arguments are
            then not allowed).
        example_inputs: Inputs used to capture a plain model (shapes decide spatial sizes).
        weight_bits: Weight bit-width of every layer of a plain model (default 32 = FP32).
        act_bits: Input-activation bit-width of every layer of a plain model.
        overrides: ``{layer_name: (b_w, b_a)}`` for a plain model; names as in the report.
        leaf_modules: Module classes kept opaque when capturing a plain model (as in
            :func:`~djpq_compiler.analyze`, which a ``CaptureError`` recommends).
        concrete_args: Forward arguments fixed when capturing a plain model.

    Returns:
        A :class:`BopsReport`.
    """
    stage = records.stage(model) if isinstance(model, fx.GraphModule) else None
    if isinstance(model, fx.GraphModule) and stage in _ROW_SOURCES:
        if overrides or weight_bits != FP32_BITS or act_bits != FP32_BITS:
            raise ConfigError(f"bops(): a {stage} model carries its own bit-widths; do not pass "
                              "weight_bits/act_bits/overrides")
        if leaf_modules or concrete_args is not None:
            raise ConfigError(f"bops(): a {stage} model is already captured; do not pass "
                              "leaf_modules/concrete_args")
        return _ROW_SOURCES[stage](model)
    if example_inputs is None:
        if not (isinstance(model, fx.GraphModule) and _has_shapes(model)):
            raise ConfigError("bops(model, example_inputs): example_inputs are required to "
                              "capture a plain model")
        gm = model
    else:
        from djpq_compiler.passes.capture import capture

        gm = capture(model, example_inputs, leaf_modules=tuple(leaf_modules),
                     concrete_args=concrete_args).graph_module
    _check_bits("weight_bits", weight_bits)
    _check_bits("act_bits", act_bits)
    overrides = dict(overrides or {})
    for name, pair in overrides.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ConfigError(f"bops(): overrides[{name!r}] must be a (b_w, b_a) pair, "
                              f"got {pair!r}")
        _check_bits(f"overrides[{name!r}] b_w", pair[0])
        _check_bits(f"overrides[{name!r}] b_a", pair[1])
    layers = find_layers(gm)
    unknown = set(overrides) - {layer.name for layer in layers}
    if unknown:
        raise ConfigError(f"bops(): overrides name no conv/linear layer: {sorted(unknown)}; "
                          f"layers are {[layer.name for layer in layers]}")
    rows = []
    for layer in layers:
        b_w, b_a = overrides.get(layer.name, (weight_bits, act_bits))
        rows.append(row_for_layer(layer, b_w, b_a))
    return BopsReport(tuple(rows), stage="float")


def _check_bits(label: str, value: object) -> None:
    """Bit-widths are real numbers in ``(0, 32]``; anything else would give nonsense BOPs."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        0 < float(value) <= FP32_BITS
    if not ok:
        raise ConfigError(f"bops(): {label} must be a number in (0, {FP32_BITS}], got {value!r}")


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any("tensor_meta" in n.meta for n in gm.graph.nodes)

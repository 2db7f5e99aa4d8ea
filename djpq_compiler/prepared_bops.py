"""BOPs of a prepared model (``bops(prepared)``) and its per-layer summary.

Rows use the **read-out** bit-widths (``DQQuantizer.readout_bits``: ``ceil`` of the continuous
bits, or the next allowed value when restricted) and the **hard** kept channel counts (the gates'
``deploy_mask`` — ``keep_mask`` never empty, as ``convert`` keeps it — through each
member's atom index). ``b_a`` is the read-out bits of the quantizer of
the tensor the layer reads: ``config.input_bits`` for the network input; 32 where there is no
quantizer (``quantize=False``, ignored layers) or it is disabled (the report describes what the
model computes). Depthwise layers are handled by :class:`~djpq_compiler.bops.BopsRow`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from djpq_compiler.bops import FP32_BITS, BopsReport, BopsRow, register_row_source
from djpq_compiler.prepared import PreparedLayer, gate_of, prepared_layers, quantizer_at, unwrap
from djpq_compiler.records import prepared_record

__all__ = ["prepared_bops", "prepared_row", "LayerSummary", "SummaryRow", "layer_summary"]


def _readout(gm: nn.Module, path: str | None) -> tuple[float, float]:
    """``(read-out bits, continuous training bits)`` of the quantizer at ``path``."""
    q = quantizer_at(gm, path)
    if q is None or not q.enabled:
        return float(FP32_BITS), float(FP32_BITS)
    with torch.no_grad():
        return float(q.readout_bits()), float(q.bits().mean())


def _hard_count(gm: nn.Module, group: int | None, counts: tuple[int, ...] | None,
                full: int) -> float:
    gate = gate_of(gm, group)
    if gate is None or counts is None:
        return float(full)
    keep = gate.deploy_mask(_round_to(gm)).cpu()
    return float((keep.to(torch.float64) * torch.tensor(counts, dtype=torch.float64)).sum())


def _round_to(gm: nn.Module) -> int:
    return prepared_record(unwrap(gm)).config.round_to


def prepared_row(gm: nn.Module, rec: PreparedLayer) -> BopsRow:
    """The :class:`BopsRow` of one layer of a prepared model."""
    return BopsRow(
        name=rec.name, op=rec.kind, kernel_positions=rec.kernel_positions, groups=rec.groups,
        in_total=rec.in_channels, out_total=rec.out_channels,
        in_kept=_hard_count(gm, rec.in_group, rec.in_counts, rec.in_channels),
        out_kept=_hard_count(gm, rec.out_group, rec.out_counts, rec.out_channels),
        b_w=_readout(gm, rec.weight_quantizer)[0], b_a=_readout(gm, rec.input_quantizer)[0])


@register_row_source("prepared")
def prepared_bops(gm: fx.GraphModule) -> BopsReport:
    """BOPs report of a prepared model (dispatched to by :func:`djpq_compiler.bops`)."""
    rows = tuple(prepared_row(gm, rec) for rec in prepared_layers(gm))
    return BopsReport(rows, stage="prepared")


@dataclass(frozen=True)
class SummaryRow:
    """One layer of :func:`layer_summary`.

    ``b_w``/``b_a`` are read-out bits, ``b_w_train``/``b_a_train`` the continuous training values
    (32 for float); ``share`` is the layer's fraction of the model's BOPs.
    """

    name: str
    op: str
    b_w: float
    b_a: float
    b_w_train: float
    b_a_train: float
    in_kept: float
    in_total: int
    out_kept: float
    out_total: int
    bops: float
    share: float


@dataclass(frozen=True)
class LayerSummary:
    """Per-layer state of a prepared model; ``str()`` prints it as a table."""

    rows: tuple[SummaryRow, ...]
    total_bops: float
    fp32_bops: float

    def table(self) -> str:
        head = (f"{'layer':<28} {'op':<7} {'b_w':>10} {'b_a':>10} {'in kept':>11} "
                f"{'out kept':>11} {'MBOPs':>10} {'share':>6}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name[:28]:<28} {r.op:<7} {r.b_w:>3.0f} ({r.b_w_train:>4.1f}) "
                f"{r.b_a:>3.0f} ({r.b_a_train:>4.1f}) {f'{r.in_kept:g}/{r.in_total}':>11} "
                f"{f'{r.out_kept:g}/{r.out_total}':>11} {r.bops / 1e6:>10.3f} "
                f"{100 * r.share:>5.1f}%")
        lines.append("-" * len(head))
        ratio = self.fp32_bops / self.total_bops if self.total_bops else float("inf")
        lines.append(f"total {self.total_bops / 1e9:.4f} GBOPs | FP32 {self.fp32_bops / 1e9:.4f}"
                     f" GBOPs | {ratio:.1f}x fewer")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def layer_summary(prepared: nn.Module) -> LayerSummary:
    """Per-layer bits (read-out and training), kept channels and BOPs share of a prepared model."""
    gm = unwrap(prepared)
    report = prepared_bops(gm)  # type: ignore[arg-type]
    total = report.total or 1.0
    rows = []
    for rec, row in zip(prepared_layers(gm), report.rows, strict=True):
        rows.append(SummaryRow(
            name=row.name, op=row.op, b_w=row.b_w, b_a=row.b_a,
            b_w_train=_readout(gm, rec.weight_quantizer)[1],
            b_a_train=_readout(gm, rec.input_quantizer)[1], in_kept=row.in_kept,
            in_total=row.in_total, out_kept=row.out_kept, out_total=row.out_total,
            bops=row.bops, share=row.bops / total))
    return LayerSummary(tuple(rows), report.total, report.fp32_total)

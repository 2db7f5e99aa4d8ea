"""bops(prepared): read-out bits, hard kept channels through the groups, and layer_summary."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import Concat, FlattenLinear, InvertedResidual, Residual
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.config import DJPQConfig
from djpq_compiler.records import prepared_record

X3 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
X1 = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
CASES = [(Residual, X3), (InvertedResidual, X3), (Concat, X3), (FlattenLinear, X1)]


def _prepare(model: nn.Module, x: torch.Tensor, **cfg: object) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return djpq.prepare(model.eval(), x, DJPQConfig(**cfg))  # type: ignore[arg-type]


def _rows(report: djpq.BopsReport) -> dict[str, tuple[float, ...]]:
    return {r.name: (r.in_kept, r.out_kept, r.b_w, r.b_a, r.bops) for r in report.rows}


@pytest.mark.parametrize("factory,x", CASES)
def test_open_gates_at_8_bits_match_the_float_counter(factory: type[nn.Module],
                                                      x: torch.Tensor) -> None:
    model = factory()
    report = djpq.bops(_prepare(model, x))
    assert report.stage == "prepared"
    assert _rows(report) == _rows(djpq.bops(model, x, weight_bits=8, act_bits=8))


@pytest.mark.parametrize("factory,x", CASES)
def test_network_input_counts_at_input_bits(factory: type[nn.Module], x: torch.Tensor) -> None:
    model = factory()
    prepared = _prepare(model, x, input_bits=4)
    ref = djpq.bops(model, x, weight_bits=8, act_bits=8)
    for rec, row, ref_row in zip(prepared_record(prepared).layers, djpq.bops(prepared).rows,
                                 ref.rows, strict=True):
        assert row.b_a == (4 if rec.network_input else 8)
        assert row.bops == ref_row.bops * (0.5 if rec.network_input else 1.0)


def test_closing_half_a_group_halves_out_channels_and_consumer_inputs() -> None:
    gm = _prepare(Residual(), X3)
    group = prepared_record(gm).layers[1].out_group  # conv1's own group (6 channels)
    with torch.no_grad():
        gm.djpq_gates[f"g{group}"].mu[:3] = 0.0
    rows = {r.name: r for r in djpq.bops(gm).rows}
    assert (rows["conv1"].out_kept, rows["conv1"].out_total) == (3, 6)
    assert (rows["conv2"].in_kept, rows["conv2"].in_total) == (3, 6)
    assert rows["conv1"].bops == pytest.approx(0.5 * 8 * 8 * 576 * 6 * 8)
    assert rows["stem"].out_kept == 8


def test_depthwise_keeps_one_input_per_output_channel() -> None:
    gm = _prepare(InvertedResidual(), X3)
    dw = next(r for r in prepared_record(gm).layers if r.name == "dw")
    before = {r.name: r for r in djpq.bops(gm).rows}
    with torch.no_grad():
        gm.djpq_gates[f"g{dw.out_group}"].mu[::2] = 0.0
    rows = {r.name: r for r in djpq.bops(gm).rows}
    assert rows["expand"].out_kept == rows["dw"].out_kept == rows["project"].in_kept == 8
    assert rows["dw"].in_per_group_kept == 1
    assert rows["dw"].bops == pytest.approx(before["dw"].bops / 2)


def test_concat_members_count_their_own_atoms() -> None:
    gm = _prepare(Concat(), X3)
    a = prepared_record(gm).layers[0]
    with torch.no_grad():
        gm.djpq_gates[f"g{a.out_group}"].mu[[0, 5, 6]] = 0.0  # one atom of a, two of b
    rows = {r.name: r for r in djpq.bops(gm).rows}
    assert (rows["a"].out_kept, rows["b"].out_kept, rows["head"].in_kept) == (3, 4, 7)


def test_float_and_disabled_quantizers_count_32_bits() -> None:
    gm = _prepare(Residual(), X3, quantize=False)
    assert all((r.b_w, r.b_a) == (32, 32) for r in djpq.bops(gm).rows)
    gm = _prepare(Residual(), X3)
    djpq.set_quantizers(gm, enabled=False)
    assert djpq.bops(gm).ratio == 1.0


@pytest.mark.parametrize("restricted,expected", [(False, 5), (True, 8)])
def test_read_out_bits_are_rounded(restricted: bool, expected: int) -> None:
    gm = _prepare(Residual(), X3, restricted=restricted)
    q = gm.get_submodule("conv1.parametrizations.weight.0")
    with torch.no_grad():  # continuous bits 4.5: ceil -> 5, restricted -> 8
        q.log_d.copy_(q.log_q_max - math.log(2.0**3.5 - 1))
    assert djpq.bops(gm).row("conv1").b_w == expected


def test_layer_summary_table() -> None:
    gm = _prepare(Residual(), X3)
    with torch.no_grad():
        gm.djpq_gates.g1.mu[:2] = 0.0
    summary = djpq.layer_summary(gm)
    assert [r.name for r in summary.rows] == ["stem", "conv1", "conv2", "fc"]
    assert sum(r.share for r in summary.rows) == pytest.approx(1.0)
    conv1 = summary.rows[1]
    assert (conv1.out_kept, conv1.out_total, conv1.b_w, conv1.b_a) == (4, 6, 8, 8)
    assert conv1.b_w_train == pytest.approx(8.0, abs=1e-3)
    text = str(summary)
    assert "conv1" in text and "4/6" in text and "GBOPs" in text
    assert summary.total_bops == djpq.bops(gm).total

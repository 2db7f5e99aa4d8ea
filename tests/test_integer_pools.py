"""Average pools into a finer quantizer round once in the integer model, in every backend.

A pool with one divisor everywhere (no padding, counted padding, ``divisor_override``, a
``ceil_mode`` that adds no partial window, even adaptive bins) becomes an exact window sum that
the next quantizer requantizes once. A pool whose windows differ (uncounted padding, partial
``ceil_mode`` windows, uneven adaptive bins) becomes ``IntPoolRequantize``: sums and one
multiplier per window divisor. Either way the integer model stays within 1 LSB of fake-quant, and
TVM and onnxruntime compute the reference's integers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.ir import modules as im
from djpq_compiler.modules.quantizers import levels
from djpq_compiler.prepared import freeze_for_deployment, quantizers
from djpq_compiler.records import converted_record
from djpq_compiler.verify import integer_agreement


class _Functional(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, **self.kwargs)  # type: ignore[arg-type]


#: (id, pool, module that must compute it); the input is 8x8
POOLS = [
    ("counted_padding", nn.AvgPool2d(3, 1, 1), im.IntAvgPool2d),
    ("divisor_override", nn.AvgPool2d(2, 2, divisor_override=3), im.IntAvgPool2d),
    ("ceil_mode_no_partial", nn.AvgPool2d(2, 2, ceil_mode=True), im.IntAvgPool2d),
    ("functional_padding", _Functional(kernel_size=3, stride=2, padding=1), im.IntAvgPool2d),
    ("uncounted_padding", nn.AvgPool2d(3, 1, 1, count_include_pad=False), im.IntPoolRequantize),
    ("ceil_mode_partial", nn.AvgPool2d(3, 2, ceil_mode=True), im.IntPoolRequantize),
    ("ceil_uncounted", nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
     im.IntPoolRequantize),
    ("uneven_adaptive", nn.AdaptiveAvgPool2d(3), im.IntPoolRequantize),
    ("functional_uncounted", _Functional(kernel_size=3, stride=1, padding=1,
                                         count_include_pad=False), im.IntPoolRequantize),
]


def _coarse_to_fine(pool: nn.Module, flatten: bool = False) -> torch.fx.GraphModule:
    """3-bit codes into the pool, an 8-bit quantizer after it: ~36x finer output grid."""
    torch.manual_seed(0)
    tail: list[nn.Module] = [nn.Flatten(), nn.LazyLinear(4)] if flatten else \
        [nn.Conv2d(8, 4, 3, padding=1)]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.ReLU(), pool, *tail)
    model(torch.randn(1, 3, 8, 8))  # materializes the lazy linear
    model.eval()
    p = djpq.prepare(model, torch.randn(2, 3, 8, 8)).eval()
    acts = [q for name, q in quantizers(p) if name.startswith("djpq_quant.a_")]
    with torch.no_grad():  # the last two: after the ReLU (pool input) and after the pool
        for q, bits in ((acts[-2], 3), (acts[-1], 8)):
            q.log_d.copy_(torch.log(q.q_grid() / float(levels(bits, q.signed))))
    freeze_for_deployment(p)
    return p


@pytest.mark.parametrize("pool,expected", [c[1:] for c in POOLS], ids=[c[0] for c in POOLS])
def test_pool_into_a_finer_quantizer_rounds_once(pool: nn.Module, expected: type) -> None:
    prepared = _coarse_to_fine(pool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = djpq.convert(prepared)
    kinds = [type(m) for m in converted.djpq_int.children()]
    assert expected in kinds
    assert converted_record(converted).agreement_bounds == {}
    x = torch.randn(16, 3, 8, 8)
    lsb = integer_agreement(prepared, converted, x)
    assert max(lsb.values()) <= 1, lsb


def test_flatten_between_uneven_pool_and_quantizer_is_fused_too() -> None:
    prepared = _coarse_to_fine(nn.AdaptiveAvgPool2d(3), flatten=True)
    converted = djpq.convert(prepared)
    assert im.IntPoolRequantize in [type(m) for m in converted.djpq_int.children()]
    assert max(integer_agreement(prepared, converted, torch.randn(8, 3, 8, 8)).values()) <= 1


class _PoolIntoFloatOp(nn.Module):
    """An uneven pool of an integer tensor (also read by a conv) whose result only a float op
    reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 4, 1)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(self.mix(torch.tanh(self.conv(x))))
        return self.side(r) + self.out(torch.sigmoid(self.pool(r)))


def test_uneven_pool_read_by_a_float_op_runs_in_float() -> None:
    torch.manual_seed(0)
    p = djpq.prepare(_PoolIntoFloatOp().eval(), torch.randn(2, 3, 8, 8)).eval()
    named = dict(quantizers(p))
    with torch.no_grad():  # coarse codes into the pool, a fine grid after the float op
        for name, bits in (("djpq_quant.a_relu", 3), ("djpq_quant.a_sigmoid", 8)):
            q = named[name]
            q.log_d.copy_(torch.log(q.q_grid() / float(levels(bits, q.signed))))
    freeze_for_deployment(p)
    converted = djpq.convert(p)
    assert "pool" in converted_record(converted).float_ops
    assert converted_record(converted).agreement_bounds == {}
    lsb = integer_agreement(p, converted, torch.randn(8, 3, 8, 8))
    assert max(lsb.values()) <= 1, lsb


BACKEND_POOLS = [c for c in POOLS if c[0] in ("counted_padding", "ceil_mode_partial",
                                               "ceil_uncounted", "uneven_adaptive")]


@pytest.mark.parametrize("pool", [c[1] for c in BACKEND_POOLS], ids=[c[0] for c in BACKEND_POOLS])
def test_tvm_and_onnxruntime_compute_the_pools_exactly(pool: nn.Module, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tvm")
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends import onnx as onnx_backend
    from djpq_compiler.backends import tvm as tvm_backend

    converted = djpq.convert(_coarse_to_fine(pool))
    x = torch.randn(8, 3, 8, 8)
    ref = converted(x)
    assert torch.equal(tvm_backend.build(converted, "x86", x)(x), ref)
    path = tmp_path / "m.onnx"
    onnx_backend.export(converted, path, x)
    report = onnx_backend.verify(converted, path, x)
    assert report["max_lsb_any"] == 0, report["nodes"]

"""A layer whose accumulator step ``s_x * s_w`` is coarser than its output step.

Rounding its bias to ``s_x * s_w`` would move outputs by several output LSB, so ``convert`` gives
the bias ``acc_shift`` extra fractional bits (``acc * 2^k + bias``). The reference, TVM and
onnxruntime must compute the same integers, and the integer model must stay within 1 LSB of
fake-quant (DESIGN invariant 4) without a warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.ir import modules as im
from djpq_compiler.modules.quantizers import levels
from djpq_compiler.passes.lowering.layers import bias_agreement_lsb
from djpq_compiler.prepared import freeze_for_deployment, quantizers
from djpq_compiler.records import converted_record
from djpq_compiler.verify import integer_agreement


def _coarse_model() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """conv2 reads 3-bit codes with 3-bit weights and writes 8-bit codes: s_x*s_w/s_out ~ 10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = djpq.prepare(model, x).eval()
    named = dict(quantizers(prepared))
    with torch.no_grad():
        prepared.get_submodule("3").bias.uniform_(-0.5, 0.5)
        for name, bits in (("3.parametrizations.weight.0", 3), ("djpq_quant.a__2", 3),
                           ("djpq_quant.a__4", 8)):
            q = named[name]
            q.log_d.copy_(torch.log(q.q_grid() / float(levels(bits, q.signed))))
    freeze_for_deployment(prepared)
    return prepared, torch.randn(64, 3, 8, 8)


@pytest.fixture(scope="module")
def coarse() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, torch.Tensor]:
    prepared, x = _coarse_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coarse-bias warning any more
        converted = djpq.convert(prepared)
    return prepared, converted, x


def test_coarse_layer_gets_a_finer_bias_and_keeps_one_lsb(coarse) -> None:  # type: ignore[no-untyped-def]
    prepared, converted, x = coarse
    layer = converted.get_submodule("djpq_int.conv__3")
    assert isinstance(layer, im.IntConv2d) and layer.acc_shift >= 1
    # at the accumulator step itself the bias would be more than 1 LSB off
    k = layer.acc_shift
    exact_fine = layer.bias.double()  # bias at s_x*s_w/2^k; back at s_x*s_w it rounds to:
    coarse_bias = torch.round(exact_fine / 2**k)
    multiplier = layer.in_scale * layer.w_scale / converted.get_submodule(
        "djpq_int.conv__3").out_scale
    assert bias_agreement_lsb(exact_fine / 2**k, coarse_bias, multiplier) > 1
    # layers that do not need it keep the plain bias
    assert converted.get_submodule("djpq_int.conv__0").acc_shift == 0
    assert converted_record(converted).agreement_bounds == {}
    lsb = integer_agreement(prepared, converted, x)
    assert lsb["djpq_quant_a__4"] <= 1 and max(lsb.values()) <= 1


def test_finer_bias_survives_save_and_load(coarse, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, converted, x = coarse
    path = djpq.save_converted(converted, tmp_path / "m.djpq")
    loaded = djpq.load_converted(path)
    assert loaded.get_submodule("djpq_int.conv__3").acc_shift == \
        converted.get_submodule("djpq_int.conv__3").acc_shift
    assert torch.equal(loaded(x), converted(x))


def test_tvm_computes_the_finer_bias_bit_exactly(coarse) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tvm")
    from djpq_compiler.backends import tvm as tvm_backend

    _, converted, x = coarse
    lib = tvm_backend.build(converted, "x86", x)
    assert torch.equal(lib(x), converted(x))


def test_onnxruntime_computes_the_finer_bias_exactly(coarse, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends import onnx as onnx_backend

    _, converted, x = coarse
    path = tmp_path / "m.onnx"
    onnx_backend.export(converted, path, x)
    report = onnx_backend.verify(converted, path, x)
    assert report["nodes"]["djpq_int_conv__3"] == 0
    assert report["max_lsb_any"] == 0

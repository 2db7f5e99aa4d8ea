"""Regression tests for silent wrong answers and crashes found on models the suite never saw
(issue #16): each test pins one defect that was fixed."""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import djpq_compiler as djpq
from djpq_compiler import verify
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.passes.capture import capture
from djpq_compiler.passes.sign_analysis import nonnegative_nodes
from djpq_compiler.prepared import freeze_for_deployment, set_gates_deterministic, set_quantizers
from djpq_compiler.verify import pruning_oracle

Fn = Callable[[torch.Tensor], torch.Tensor]

# --------------------------------------------------------------------------- sign analysis
#: ``y = relu(conv(x))`` then the expression: is the expression's value provably ``>= 0``
#: (an unsigned activation quantizer)? ``False`` = may be negative (signed quantizer). Before the
#: fix every scalar operand was ignored, so the first four rows were unsigned and the integer
#: model clipped every value to 0.
SIGN_CASES: dict[str, tuple[Fn, bool]] = {
    "y * -1.0": (lambda y: y * -1.0, False),
    "torch.mul(y, -2.0)": (lambda y: torch.mul(y, -2.0), False),
    "y + (-0.5)": (lambda y: y + (-0.5), False),
    "-3.0 + y": (lambda y: -3.0 + y, False),
    "y.add(sigmoid(y), alpha=-1)": (lambda y: y.add(torch.sigmoid(y), alpha=-1), False),
    "torch.add(y, 1.0, alpha=-2)": (lambda y: torch.add(y, 1.0, alpha=-2), False),
    "y / -2.0": (lambda y: y / -2.0, False),
    "y.div(-2.0)": (lambda y: y.div(-2.0), False),
    "y.clamp(-1.0, -0.5)": (lambda y: y.clamp(-1.0, -0.5), False),
    "y.clamp(max=-0.5)": (lambda y: y.clamp(max=-0.5), False),
    "torch.clamp_max(y, -0.5)": (lambda y: torch.clamp_max(y, -0.5), False),
    "F.hardtanh(y - 1.0)": (lambda y: F.hardtanh(y - 1.0), False),
    "-y": (lambda y: -y, False),
    "1.0 - y": (lambda y: 1.0 - y, False),
    "y - 3.0": (lambda y: y - 3.0, False),
    "y.sub(0.5)": (lambda y: y.sub(0.5), False),
    "torch.rsub(y, 1.0)": (lambda y: torch.rsub(y, 1.0), False),
    "(y - 3.0) ** 3": (lambda y: (y - 3.0) ** 3, False),
    "y * 2.0": (lambda y: y * 2.0, True),
    "0.5 * y": (lambda y: 0.5 * y, True),
    "torch.mul(y, 2)": (lambda y: torch.mul(y, 2), True),
    "y + 0.5": (lambda y: y + 0.5, True),
    "0.25 + y": (lambda y: 0.25 + y, True),
    "y.add(sigmoid(y), alpha=2)": (lambda y: y.add(torch.sigmoid(y), alpha=2), True),
    "y - (-1.0)": (lambda y: y - (-1.0), True),
    "y.sub(1.0, alpha=-1)": (lambda y: y.sub(1.0, alpha=-1), True),
    "torch.rsub(y, 1.0, alpha=-1)": (lambda y: torch.rsub(y, 1.0, alpha=-1), True),
    "y / 2.0": (lambda y: y / 2.0, True),
    "y // 2.0": (lambda y: y // 2.0, True),
    "(y - 3.0) ** 2": (lambda y: (y - 3.0) ** 2, True),
    "y.clamp(min=-1.0)": (lambda y: y.clamp(min=-1.0), True),
    "torch.clamp(y - 3.0, 0.5, 2.0)": (lambda y: torch.clamp(y - 3.0, 0.5, 2.0), True),
    "F.hardtanh(y)": (lambda y: F.hardtanh(y), True),
    # shape/dim arguments are not operands: a -1 there says nothing about the sign
    "y.view(-1, 8, 8, 8)": (lambda y: y.view(-1, 8, 8, 8), True),
    "y.reshape(-1, 8, 8, 8)": (lambda y: y.reshape(-1, 8, 8, 8), True),
    "y.transpose(-1, -2)": (lambda y: y.transpose(-1, -2), True),
    "y.mean(-1, keepdim=True)": (lambda y: y.mean(-1, keepdim=True), True),
    "y[:, :, -4:]": (lambda y: y[:, :, -4:], True),
}

#: Modules between the ReLU and the next conv: (module, expected non-negative).
SIGN_MODULE_CASES: dict[str, tuple[nn.Module, bool]] = {
    "nn.Hardtanh(-2.0, -1.0)": (nn.Hardtanh(-2.0, -1.0), False),
    "nn.Hardtanh(-1.0, 1.0)": (nn.Hardtanh(-1.0, 1.0), True),
    "nn.ReLU6()": (nn.ReLU6(), True),
}


class _Lambda(nn.Module):
    def __init__(self, fn: Fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fn(y)


class _ReluThen(nn.Module):
    """``conv2(op(relu(conv1(x))))``: ``op`` is traced inline (a function) or as a module."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.op(torch.relu(self.conv1(x))))


def _model(name: str) -> _ReluThen:
    torch.manual_seed(0)
    if name in SIGN_CASES:
        return _ReluThen(_Lambda(SIGN_CASES[name][0])).eval()
    return _ReluThen(SIGN_MODULE_CASES[name][0]).eval()


def _expected(name: str) -> bool:
    return SIGN_CASES[name][1] if name in SIGN_CASES else SIGN_MODULE_CASES[name][1]


ALL_SIGN_CASES = [*SIGN_CASES, *SIGN_MODULE_CASES]
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ALL_SIGN_CASES)
def test_sign_analysis_counts_scalar_operands(name: str) -> None:
    model = _model(name)
    gm = capture(model, X).graph_module  # _Lambda is traced through (not a leaf)
    conv2 = next(n for n in gm.graph.nodes if n.target == "conv2")
    value = conv2.args[0]
    assert isinstance(value, fx.Node)
    assert (value.name in nonnegative_nodes(gm)) is _expected(name), value.format_node()


@pytest.mark.parametrize("name", ALL_SIGN_CASES)
def test_integer_model_stays_within_quantization_error_of_fp32(name: str) -> None:
    model = _model(name)
    prepared = djpq.prepare(model, X)
    quant = prepared.get_submodule(prepared.meta["djpq.input_quantizers"]["conv2"])
    if not _expected(name):
        assert quant.signed  # provably possibly-negative values keep a signed quantizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ops left in float
        converted = djpq.convert(prepared)
    with torch.no_grad():
        ref, out = model(X), converted(X)
    spread = float(ref.max() - ref.min())
    # 8-bit weights and activations: a few tenths of a percent; the unsigned bug gave 45-98 %
    assert float((out - ref).abs().max()) <= 0.03 * spread, name


# --------------------------------------------------------------------------- dead split pieces
class _SplitUnusedPiece(nn.Module):
    """Res2Net-style multi-scale block whose ``torch.split`` leaves a piece unused (a dead
    ``getitem`` in the traced graph): ``how`` picks split / chunk / a slice."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.stem(x)))
        if self.how == "split":
            a, _, c = torch.split(y, [4, 2, 2], dim=1)
            del c
        elif self.how == "chunk":
            a, _ = y.chunk(2, dim=1)
        else:
            a, _ = y[:, :4], y[:, 4:]
        return self.head(torch.relu(self.branch(a)) + a)


@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_unused_split_piece_converts(how: str) -> None:
    torch.manual_seed(0)
    model = _SplitUnusedPiece(how).eval()
    report = djpq.analyze(model, X)
    assert not [n for n in report.graph_module.graph.nodes
                if n.target is operator.getitem and not n.users]
    prepared = djpq.prepare(model, X).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        floating = djpq.convert(prepared, integer=False)
        integer = djpq.convert(prepared)
    hard = copy.deepcopy(prepared)
    set_quantizers(hard, False)
    set_gates_deterministic(hard, True)
    with torch.no_grad():
        assert torch.allclose(floating(X), hard(X), atol=1e-5, rtol=1e-4)  # invariant 1
        ref = model(X)
        assert float((integer(X) - ref).abs().max()) <= 0.05 * float(ref.max() - ref.min())
    # the stem's unused channels are prunable; pruning them keeps the output exact
    _, err, before, after = pruning_oracle(model, X, seed=1)
    assert err < 1e-4 and after <= before


# --------------------------------------------------------------------------- weight rounding ties
def _tie_model() -> tuple[nn.Module, torch.fx.GraphModule, DQQuantizer, float, float]:
    """A prepared conv whose snapped weight quantizer runs on ``exp(log d)`` while the read-out
    step is ``q_max / levels``: the two differ by float ulps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    prepared = djpq.prepare(model, X).eval()
    quant = prepared.get_submodule(prepared.meta["djpq.weight_quantizers"]["_0"])
    assert isinstance(quant, DQQuantizer)
    for i in range(1000):  # a clip range whose two step computations differ
        with torch.no_grad():
            quant.log_q_max.fill_(math.log(0.3 + 1e-4 * i))
            quant.log_d.fill_(math.log((0.3 + 1e-4 * i) / 127))
        freeze_for_deployment(prepared)
        d_forward, d_readout = float(quant.d()), float(quant.snapped().d)
        if d_forward != d_readout:
            return model, prepared, quant, d_forward, d_readout
    raise AssertionError("no clip range with differing steps found")


def _tie_weight(d_forward: float, d_readout: float) -> float:
    """A float32 weight near ``30.5 * d`` that rounds to different codes on the two steps."""
    w = torch.tensor(30.5 * min(d_forward, d_readout), dtype=torch.float32)
    for _ in range(64):  # walk up through 30.5 * [d_low, d_high] one float32 ulp at a time
        if torch.round(w / d_forward) != torch.round(w / d_readout):
            return float(w)
        w = torch.nextafter(w, torch.tensor(math.inf))
    raise AssertionError("no tie found")


def test_weights_at_a_rounding_tie_round_like_the_fake_quant_quantizer() -> None:
    _, prepared, quant, d_forward, d_readout = _tie_model()
    w_tie = _tie_weight(d_forward, d_readout)
    conv = prepared.get_submodule("0")
    with torch.no_grad():
        conv.parametrizations.weight.original[0, 0, 0, 0] = w_tie
        fake = conv.weight.detach().clone()  # the fake-quant weight (quantizer's forward)
    converted = djpq.convert(prepared)
    codes = converted.get_submodule("djpq_int.conv__0").weight
    want = torch.round(fake.to(torch.float64) / d_forward).to(torch.int64)
    # the one tie (and every other weight): the integer codes are the fake-quant codes
    assert torch.equal(codes.abs(), want.abs())  # signs may flip with a negative BN scale
    assert max(verify.integer_agreement(prepared, converted, X).values()) <= 1


# --------------------------------------------------------------------------- bias beyond int32
def _big_bias_model(units: float) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """conv -> relu -> conv whose channel 0 bias is ``units`` accumulator steps (s_x * s_w)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    prepared = djpq.prepare(model, X).eval()
    freeze_for_deployment(prepared)
    s_x = float(prepared.get_submodule(prepared.meta["djpq.input_quantizers"]["_2"]).snapped().d)
    quant_w = prepared.get_submodule(prepared.meta["djpq.weight_quantizers"]["_2"])
    with torch.no_grad():
        prepared.get_submodule("2").bias[0] = units * s_x * float(quant_w.d())
    return prepared, X


@pytest.mark.parametrize("units", [3e9, 2**31 - 1000.0])  # beyond int32; within but next to it
def test_bias_beyond_int32_room_is_clamped_loudly_and_saturates_alike(units: float) -> None:
    from djpq_compiler.backends.reference.ops import accumulator_bound
    from djpq_compiler.errors import BiasSaturationWarning

    prepared, x = _big_bias_model(units)
    with pytest.warns(BiasSaturationWarning, match=r"layer _2: channel\(s\) \[0\]"):
        converted = djpq.convert(prepared)
    layer = converted.get_submodule("djpq_int.conv__2")
    acc_max = accumulator_bound(8 * 9, 8, int(layer.w_bits)) << int(layer.acc_shift)  # u8 input
    # |acc| + |bias| fits int32: an int32 accumulator (onnxruntime) cannot wrap
    assert int(layer.bias.abs().max()) + acc_max <= 2**31 - 1
    assert max(verify.integer_agreement(prepared, converted, x).values()) <= 1


def test_bias_beyond_int32_agrees_in_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends import onnx as onnx_backend

    prepared, x = _big_bias_model(2**31 - 1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = djpq.convert(prepared)
    path = tmp_path / "m.onnx"
    onnx_backend.export(converted, path, x)
    report = onnx_backend.verify(converted, path, x)
    assert report["max_lsb_any"] <= 1

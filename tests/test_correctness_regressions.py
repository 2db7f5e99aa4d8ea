"""Regression tests for silent wrong answers and crashes found on models the suite never saw
(issue #16): each test pins one defect that was fixed."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.passes.capture import capture
from djpq_compiler.passes.sign_analysis import nonnegative_nodes

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

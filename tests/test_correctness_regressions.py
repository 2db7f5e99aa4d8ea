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
from djpq_compiler.records import capture_record, converted_record, prepared_record, stage
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
    quant = prepared.get_submodule(prepared_record(prepared).quantizers.input["conv2"])
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
    quant = prepared.get_submodule(prepared_record(prepared).quantizers.weight["_0"])
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
    paths = prepared_record(prepared).quantizers
    s_x = float(prepared.get_submodule(paths.input["_2"]).snapped().d)
    quant_w = prepared.get_submodule(paths.weight["_2"])
    with torch.no_grad():
        prepared.get_submodule("2").bias[0] = units * s_x * float(quant_w.d())
    return prepared, X


@pytest.mark.parametrize("units", [3e9, 2**31 - 1000.0])  # beyond int32; within but next to it
def test_bias_beyond_int32_room_is_clamped_loudly_and_saturates_alike(units: float) -> None:
    from djpq_compiler.errors import BiasSaturationWarning
    from djpq_compiler.ir.ops import accumulator_bound

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


# --------------------------------------------------------------------------- saving and loading
class _OddNames(nn.Module):
    """regnet-style submodule names that are not identifiers, a ``torch._assert`` on the rank
    (timm-style norm layers) and torchvision's stochastic depth on a residual branch."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.add_module("block1-0", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                                  nn.BatchNorm2d(8)))
        self.drop = StochasticDepth(0.2, "row")
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # on the batch size: not static, so convert's shape folding keeps it (a static
        # `x.ndim == 4` check would be folded away)
        torch._assert(x.shape[0] >= 1, "expected a non-empty batch")
        y = self.stem(x)
        y = torch.relu(y + self.drop(getattr(self, "block1-0")(y)))
        return self.head(y)


@pytest.fixture(scope="module")
def odd_converted() -> dict[bool, torch.fx.GraphModule]:
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    prepared = djpq.prepare(_OddNames().eval(), X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {integer: djpq.convert(prepared, integer=integer) for integer in (True, False)}


@pytest.mark.parametrize("integer", [True, False])
def test_any_legal_module_name_and_assert_round_trip_in_the_safe_format(
        odd_converted, integer: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    converted = odd_converted[integer]
    assert any(n.target is torch._assert for n in converted.graph.nodes)
    assert not any("stochastic_depth" in str(n.target) for n in converted.graph.nodes)
    path = djpq.save_converted(converted, tmp_path / "m.djpq")
    loaded = djpq.load_converted(path)
    assert torch.equal(loaded(X), converted(X))
    assert stage(loaded) == "converted"


@pytest.mark.parametrize("integer", [True, False])
def test_torch_save_and_load_of_a_converted_model_keeps_it_whole(
        odd_converted, integer: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    converted = odd_converted[integer]
    torch.save(converted, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(loaded(X), converted(X))
    assert stage(loaded) == "converted" and converted_record(loaded).integer is integer
    assert djpq.bops(loaded).total == djpq.bops(converted).total
    djpq.save_converted(loaded, tmp_path / "again.djpq")  # still a converted model


def test_stochastic_depth_traced_in_train_mode_is_dropped_at_convert() -> None:
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _OddNames().train()  # the trace bakes training=True into stochastic_depth
    prepared = djpq.prepare(model, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = djpq.convert(prepared, integer=False)
    assert torch.equal(converted(X), converted(X))  # deterministic: no random row drop


# --------------------------------------------------------------------------- capture options
class _ShapeBranches(nn.Module):
    """ViT-style shape checks in the forward: symbolic_trace cannot decide them."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 8:  # resize other inputs (never taken for the example)
            x = F.interpolate(x, size=(8, 8))
        _, _, h, _ = x.shape
        y = torch.relu(self.bn(self.proj(x)))
        new_h = y.shape[2]
        if new_h != h:
            raise ValueError("unexpected height")
        return self.head(y)


class _ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        y = self.conv(x)
        if flip:
            y = -y
        return y if y.sum() > 0 else 2 * y  # on tensor values: never specialized


def test_shape_dependent_control_flow_is_captured_specialized_and_guarded() -> None:
    from djpq_compiler.errors import CaptureWarning

    torch.manual_seed(0)
    model = _ShapeBranches().eval()
    with pytest.warns(CaptureWarning, match="2 shape condition"):
        report = djpq.analyze(model, X)
    assert len(capture_record(report.graph_module).specialized) == 2
    assert len(report.prunable_groups) == 1  # the conv inside stays a prunable module
    with pytest.warns(CaptureWarning):
        prepared = djpq.prepare(model, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = djpq.convert(prepared)
    with torch.no_grad():
        ref = model(X)
        assert float((converted(X) - ref).abs().max()) <= 0.05 * float(ref.max() - ref.min())
        with pytest.raises(AssertionError, match="captured for inputs where"):
            converted(torch.randn(1, 3, 10, 10))  # would take the other branch: loud


def test_value_dependent_control_flow_is_refused() -> None:
    from djpq_compiler.errors import CaptureError

    with pytest.raises(CaptureError, match="x.sum|y.sum|control flow"):
        djpq.analyze(_ValueBranch(), X)


def test_leaf_modules_and_concrete_args_are_accepted_where_the_error_recommends_them() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 3, padding=1)
            self.block = _ValueBranch()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(torch.relu(self.stem(x)))

    torch.manual_seed(0)
    model = Wrapper().eval()
    report = djpq.analyze(model, X, leaf_modules=(_ValueBranch,))
    assert any(n.target == "block" for n in report.graph_module.graph.nodes)
    prepared = djpq.prepare(model, X, leaf_modules=[_ValueBranch])
    assert torch.allclose(prepared(X), model(X), atol=0.1)
    pruned = djpq.prune(model, X, {}, leaf_modules=(_ValueBranch,))
    assert torch.allclose(pruned(X), model(X))


class _ModeSwitch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, mode: str = "train") -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return y.mean((2, 3)) if mode == "pool" else y


def test_concrete_args_fix_a_python_argument() -> None:
    torch.manual_seed(0)
    model = _ModeSwitch().eval()
    report = djpq.analyze(model, X, concrete_args={"mode": "pool"})
    assert any(n.target == "mean" for n in report.graph_module.graph.nodes)
    prepared = djpq.prepare(model, X, concrete_args={"mode": "pool"})
    assert prepared(X).shape == (4, 4)


# --------------------------------------------------------------------------- float ops, bad inputs
class _FloatIsland(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cumsum(torch.relu(self.a(x)), dim=3))  # no integer lowering


def test_integer_convert_warns_naming_the_ops_it_left_in_float() -> None:
    torch.manual_seed(0)
    prepared = djpq.prepare(_FloatIsland().eval(), X)
    with pytest.warns(djpq.FloatOpsWarning, match=r"left \d+ op\(s\) in float: .*cumsum"):
        converted = djpq.convert(prepared)
    assert "cumsum" in converted_record(converted).float_ops
    with warnings.catch_warnings():
        warnings.simplefilter("error", djpq.FloatOpsWarning)
        djpq.convert(prepared, integer=False)  # a float convert: nothing to warn about
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(4, 4, 1)).eval()
        djpq.convert(djpq.prepare(plain, X))  # all-integer: no warning


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("entry", ["analyze", "prepare", "bops", "tuple", "calibration"])
def test_non_finite_example_inputs_are_a_clear_error(entry: str, bad: float) -> None:
    from djpq_compiler.errors import CaptureError

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    x = X.clone()
    x[0, 1, 2, 3] = bad
    kind = "NaN" if math.isnan(bad) else "infinite"
    if entry == "analyze":
        call, where = (lambda: djpq.analyze(model, x)), "example_inputs"
    elif entry == "prepare":
        call, where = (lambda: djpq.prepare(model, x)), "example_inputs"
    elif entry == "bops":
        call, where = (lambda: djpq.bops(model, x)), "example_inputs"
    elif entry == "tuple":
        call, where = (lambda: djpq.analyze(model, (x,))), r"example_inputs\[0\]"
    else:
        call, where = (lambda: djpq.prepare(model, X, calibration_data=[(X,), (x,)])), \
            r"calibration_data batch 1\[0\]"
    with pytest.raises(CaptureError, match=rf"{where} holds 1 {kind} value"):
        call()


# --------------------------------------------------------------------------- functional batch norm
class _BatchNormAct2d(nn.BatchNorm2d):
    """A timm-style fused BN + activation: rank assert, ``F.batch_norm``, dropout, activation."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        momentum = 0.0 if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, momentum, self.eps)
        return self.act(self.drop(x))


class _BnActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = _BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = _BatchNormAct2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        return self.head(self.bn2(self.conv2(y)) + y)


def _bn_act_net() -> _BnActNet:
    torch.manual_seed(0)
    model = _BnActNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def test_functional_batch_norm_gets_channels_and_folds_like_a_module() -> None:
    model = _bn_act_net()
    report = djpq.analyze(model, X)
    assert [g.prunable for g in report.groups] == [True, False]  # was: zero prunable groups
    graph = report.graph_module.graph
    assert not any(n.target is F.batch_norm for n in graph.nodes)
    assert isinstance(report.graph_module.get_submodule("bn1.bn"), nn.BatchNorm2d)  # beside act
    _, err, before, after = pruning_oracle(model, X, seed=1)
    assert err < 1e-4 and after < before
    prepared = djpq.prepare(model, X).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", djpq.FloatOpsWarning)  # everything runs in integers
        floating = djpq.convert(prepared, integer=False)
        integer = djpq.convert(prepared)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in floating.modules())
    hard = copy.deepcopy(prepared)
    set_quantizers(hard, False)
    set_gates_deterministic(hard, True)
    with torch.no_grad():
        assert torch.allclose(floating(X), hard(X), atol=1e-5, rtol=1e-4)
    assert max(verify.integer_agreement(prepared, integer, X).values()) <= 1


def test_functional_batch_norm_in_train_mode_keeps_its_statistics_update() -> None:
    model = _bn_act_net().train()
    prepared = djpq.prepare(model, X)
    bn = prepared.get_submodule("bn1.bn")
    assert isinstance(bn, nn.BatchNorm2d) and bn.training
    before = bn.running_mean.clone()
    set_quantizers(prepared, False)
    prepared(X)
    assert not torch.equal(bn.running_mean, before)  # batch statistics, running average updated


def test_functional_batch_norm_that_cannot_be_a_module_is_a_per_channel_op() -> None:
    class Shared(nn.Module):  # one weight read by two calls: stays functional
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.w = nn.Parameter(torch.ones(4))
            self.register_buffer("m", torch.zeros(4))
            self.register_buffer("v", torch.ones(4))
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.batch_norm(self.conv(x), self.m, self.v, self.w, None, False)
            return self.head(torch.relu(y * self.w.view(1, -1, 1, 1)))

    report = djpq.analyze(Shared().eval(), X)
    assert any(n.target is F.batch_norm for n in report.graph_module.graph.nodes)
    assert "batch_norm" not in report.missing

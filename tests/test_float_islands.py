"""Float islands and integer lookup tables in the reference, TVM and ONNX.

* An elementwise unary function of <= 8-bit codes read by a quantizer becomes an ``IntLUT``
  (``converted_record(c).lut_ops``): the reference agrees with fake-quant within 1 LSB, TVM and
  onnxruntime reproduce it bit for bit.
* Everything else stays a float island (``converted_record(c).float_ops``) and lowers in both
  backends:
  TVM bit-exact where the float ops are correctly rounded basic arithmetic (hardswish,
  hardsigmoid, ReLU, the squeeze-excite multiply, max pooling), within 1 LSB at the island's
  output codes where they use exp/erf/tanh or sums (documented in docs/tvm_backend.md).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import djpq_compiler as djpq
from djpq_compiler.convert import convert
from djpq_compiler.ir import modules as im
from djpq_compiler.ir.lookup import BINARY_OPS, UNARY_OPS, IntLUT, build_table
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.records import converted_record, prepared_record
from djpq_compiler.verify import integer_agreement

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")

ACTIVATIONS = {
    "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid, "hardswish": nn.Hardswish,
    "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh, "hardtanh": lambda: nn.Hardtanh(-0.5, 1.5),
}


class AfterAdd(nn.Module):
    """Each activation reads the (quantized) sum of a residual add and feeds a conv, so each
    becomes a table; then the functional / method forms and a table of unsigned codes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.acts = nn.ModuleList(make() for make in ACTIVATIONS.values())
        self.heads = nn.ModuleList(nn.Conv2d(8, 4, 1) for _ in range(len(ACTIVATIONS) + 6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.c1(x)
        y = a + self.c2(a)
        ys = [act(y) for act in self.acts]
        ys += [torch.sigmoid(y), F.gelu(y, approximate="tanh"), y.tanh(), F.silu(y)]
        r = torch.relu(y)  # read by a head: unsigned codes, a table indexed from 0
        ys += [r, F.hardswish(r)]
        return tuple(head(v) for head, v in zip(self.heads, ys, strict=True))


def _prepared(model: nn.Module, x: torch.Tensor, **config: object) -> fx.GraphModule:
    torch.manual_seed(0)
    cfg = djpq.DJPQConfig(**config) if config else None  # type: ignore[arg-type]
    return djpq.prepare(model.eval(), x, cfg).eval()


@pytest.fixture(scope="module")
def lut_model() -> tuple[fx.GraphModule, fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12) * 2
    prepared = _prepared(AfterAdd(), x)
    return prepared, convert(prepared), x


def test_unary_functions_of_codes_become_tables(lut_model: tuple) -> None:
    prepared, converted, x = lut_model
    luts = [m for m in converted.modules() if isinstance(m, IntLUT)]
    assert len(luts) == len(ACTIVATIONS) + 5
    assert any(lut.in_qmin == 0 for lut in luts) and any(lut.in_qmin < 0 for lut in luts)
    assert sorted({m.op for m in luts}) == sorted(
        {"sigmoid", "hardsigmoid", "hardswish", "silu", "gelu", "tanh", "hardtanh"})
    assert len(converted_record(converted).lut_ops) == len(luts)
    assert converted_record(converted).float_ops == ()  # everything runs in integers
    for lut in luts:
        assert lut.table.numel() == lut.in_qmax - lut.in_qmin + 1 <= 256
        assert lut.qmin <= int(lut.table.min()) and int(lut.table.max()) <= lut.qmax
    lsb = integer_agreement(prepared, converted, x)
    assert max(lsb.values()) <= 1, lsb


def test_table_is_the_float_island_it_replaces(lut_model: tuple) -> None:
    """Each entry equals Quantize(f(Dequantize(q))) run by the reference modules."""
    _, converted, _ = lut_model
    for lut in (m for m in converted.modules() if isinstance(m, IntLUT)):
        codes = torch.arange(lut.in_qmin, lut.in_qmax + 1)
        fn = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}.get(lut.op)
        if fn is None:
            continue
        want = im.Quantize(lut.out_scale, lut.out_bits, lut.out_signed)(
            fn(im.Dequantize(lut.in_scale)(codes)))
        assert torch.equal(lut(codes), want)


def test_lut_tvm_bit_exact(lut_model: tuple) -> None:
    _, converted, x = lut_model
    model = tvm_backend.build(converted, "x86", example_inputs=x)
    assert "take" in model.script()
    for seed in (0, 1):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 3
        for got, want in zip(model(inp), converted(inp), strict=True):
            assert torch.equal(got, want)


def test_lut_onnx_exact(lut_model: tuple, tmp_path) -> None:
    onnx_backend = pytest.importorskip("djpq_compiler.backends.onnx")
    pytest.importorskip("onnxruntime")
    _, converted, x = lut_model
    path = tmp_path / "lut.onnx"
    onnx_backend.export(converted, path, x)
    report = onnx_backend.verify(converted, path, x)
    luts = [n.name for n in converted.graph.nodes if n.op == "call_module"
            and isinstance(converted.get_submodule(str(n.target)), IntLUT)]
    assert all(report["per_op"][name] == 0 for name in luts), report["per_op"]
    assert report["max_lsb_per_op"] <= 1


def test_wide_input_codes_stay_float() -> None:
    """Input codes wider than 8 bits would need a table of more than 256 entries."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    prepared = _prepared(AfterAdd(), x, activation=djpq.QuantSpec(bits=10))
    converted = convert(prepared)
    assert converted_record(converted).lut_ops == ()
    assert "sigmoid" in converted_record(converted).float_ops


def test_build_table_covers_every_code() -> None:
    table = build_table(torch.sigmoid, im.Dequantize(0.1), im.Quantize(1 / 255, 8, False), -8, 7)
    assert table.shape == (16,)
    codes = torch.arange(-8, 8)
    want = torch.round(torch.sigmoid(codes * torch.tensor(0.1)) / torch.tensor(1 / 255))
    assert torch.equal(table, want.to(torch.int64))


def test_elementwise_facts_have_converters_in_both_backends() -> None:
    """Every op of the shared facts (UNARY_OPS, BINARY_OPS) lowers as a float op in TVM and ONNX
    (it is a float island wherever it does not become a table)."""
    from djpq_compiler.backends.onnx import graph as onnx_graph
    from djpq_compiler.backends.tvm import emit as tvm_emit
    from djpq_compiler.backends.tvm.float_ops import FLOAT_UNARY

    assert set(UNARY_OPS.values()) <= set(FLOAT_UNARY)
    for target in (*UNARY_OPS, *BINARY_OPS):
        assert target in tvm_emit.CONVERTERS, target
        assert target in onnx_graph.CONVERTERS, target


def test_lut_model_saves_and_loads(lut_model: tuple, tmp_path) -> None:
    from djpq_compiler.serialize import load_converted, save_converted

    _, converted, x = lut_model
    path = save_converted(converted, tmp_path / "lut.djpq")
    loaded = load_converted(path)
    assert converted_record(loaded).lut_ops == converted_record(converted).lut_ops
    for got, want in zip(loaded(x), converted(x), strict=True):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------ float islands


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, gate: type[nn.Module]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)
        self.act, self.gate = nn.ReLU(), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


def _stochastic_depth() -> nn.Module:
    """torchvision's StochasticDepth (EfficientNet's drop path; the identity in eval)."""
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:
        return nn.Identity()
    return StochasticDepth(0.2, "row")


class MBConv(nn.Module):
    """MobileNetV3 / EfficientNet-like block: expand, depthwise, squeeze-excite, project."""

    def __init__(self, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                act())
        self.se = SqueezeExcite(8, gate)
        self.project = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.drop_path = _stochastic_depth()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16),
                                  act(), nn.Dropout(0.2), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.drop_path(self.project(self.se(self.dw(y))))
        return self.head(y)


class GeluBlock(nn.Module):
    """GELU MLP-ish conv block with a float mean and a tensor-scalar op in float."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.c1(x))
        y = self.c2(y) * 0.5 + y.mean((2, 3), keepdim=True)
        return self.c3(torch.tanh(y) / 2.0)


class ReluPoolTail(nn.Module):
    """SqueezeNet-like classifier: the last conv's output goes through ReLU and pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2, ceil_mode=True))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, 5, 1), nn.ReLU(),
                                        nn.AvgPool2d(3, 2, 1, ceil_mode=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


#: name -> (model, whether every island is correctly rounded arithmetic, so TVM is bit-exact)
NETS = {
    "se_hardswish": (lambda: MBConv(nn.Hardswish, nn.Hardsigmoid), True),
    "se_silu_sigmoid": (lambda: MBConv(nn.SiLU, nn.Sigmoid), False),
    "gelu_block": (GeluBlock, False),
    "relu_pool_tail": (ReluPoolTail, False),
}


def _island_codes(converted: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``converted`` that also returns the codes of every Quantize after an island."""
    gm = copy.deepcopy(converted)
    quants = [n for n in gm.graph.nodes if n.op == "call_module"
              and isinstance(gm.get_submodule(str(n.target)), im.Quantize)
              and n.args[0].op != "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], *quants),)
    gm.recompile()
    return gm


@pytest.fixture(scope="module", params=sorted(NETS))
def island_net(request: pytest.FixtureRequest) -> tuple:
    make, exact = NETS[request.param]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 12, 12)
    # pre-activations left in float on purpose: these nets exist to exercise float islands
    prepared = _prepared(make(), x, quantize_pre_activation=False)
    return request.param, exact, prepared, convert(prepared), x


def test_island_net_reference_within_one_lsb(island_net: tuple) -> None:
    name, _, prepared, converted, x = island_net
    assert converted_record(converted).float_ops, name  # the nets exist to have islands
    lsb = integer_agreement(prepared, converted, x)
    assert max(lsb.values()) <= 1, lsb


def test_island_net_tvm(island_net: tuple) -> None:
    """Builds for x86; bit-exact where every island is basic arithmetic, otherwise within 1 LSB
    at each island's output codes and close at the float output."""
    name, exact, _, converted, x = island_net
    assert tvm_backend.unsupported_nodes(converted) == []
    probe = _island_codes(converted)
    model = tvm_backend.build(probe, "x86", example_inputs=x)
    got, want = model(x), probe(x)
    if exact:
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), name
    for g, w in zip(got[1:], want[1:], strict=True):
        assert int((g - w).abs().max()) <= 1, name
    scale = float(want[0].abs().max()) + 1e-6
    assert float((got[0] - want[0]).abs().max()) <= 0.05 * scale, name


def test_island_net_onnx(island_net: tuple, tmp_path) -> None:
    onnx_backend = pytest.importorskip("djpq_compiler.backends.onnx")
    pytest.importorskip("onnxruntime")
    name, _, _, converted, x = island_net
    path = tmp_path / f"{name}.onnx"
    onnx_backend.export(converted, path, x)
    assert onnx_backend.verify(converted, path, x)["max_lsb_per_op"] <= 1


# ------------------------------------------------------------------------------ pre-activations


class ConvBnHardswish(nn.Module):
    """conv -> BN -> hardswish -> conv -> BN -> hardswish -> pool -> linear: with the
    pre-activation quantized, every conv is an integer layer and every activation a table."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MBConvSE(MBConv):
    """MBConv + squeeze-excite without the drop path (its float identity is not the point)."""

    def __init__(self, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__(act, gate)
        self.drop_path = nn.Identity()


#: name -> (model, the float ops left after convert)
PRE_ACT_NETS = {
    "conv_bn_hardswish": (ConvBnHardswish, ()),
    "mbconv_se_hardswish": (lambda: MBConvSE(nn.Hardswish, nn.Hardsigmoid), ()),
    "mbconv_se_silu_drop_path": (lambda: MBConv(nn.SiLU, nn.Sigmoid), ()),
}


def _layer_nodes(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), (nn.Conv2d, nn.Linear))]


@pytest.fixture(scope="module", params=sorted(PRE_ACT_NETS))
def pre_act_net(request: pytest.FixtureRequest) -> tuple:
    make, float_ops = PRE_ACT_NETS[request.param]
    torch.manual_seed(2)
    x = torch.randn(2, 3, 12, 12)
    prepared = _prepared(make(), x)
    return request.param, float_ops, prepared, convert(prepared), x


def test_pre_activation_makes_layers_integer_and_activations_tables(pre_act_net: tuple) -> None:
    name, float_ops, prepared, converted, x = pre_act_net
    assert converted_record(converted).float_ops == float_ops, name
    luts = {n.name for n in converted.graph.nodes if n.op == "call_module"
            and isinstance(converted.get_submodule(str(n.target)), IntLUT)}
    assert len(luts) == len(converted_record(converted).lut_ops) >= 2
    acts = {n.name for n in prepared.graph.nodes if n.op == "call_module"
            and isinstance(prepared.get_submodule(str(n.target)),
                           (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid))}
    assert set(converted_record(converted).lut_ops) == acts  # every activation (SE gate too)
    assert set(converted_record(converted).lowered_layers) == set(_layer_nodes(prepared))
    assert not [m for m in converted.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_pre_activation_net_within_one_lsb(pre_act_net: tuple) -> None:
    _, _, prepared, converted, x = pre_act_net
    lsb = integer_agreement(prepared, converted, x)
    assert max(lsb.values()) <= 1, lsb


def test_pre_activation_net_tvm_bit_exact(pre_act_net: tuple) -> None:
    """Tables, integer layers and the SE multiply (correctly rounded) are all bit-exact."""
    name, _, _, converted, x = pre_act_net
    probe = _island_codes(converted)
    model = tvm_backend.build(probe, "x86", example_inputs=x)
    for seed in (0, 1):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 2
        got, want = model(inp), probe(inp)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), name


def test_pre_activation_net_onnx(pre_act_net: tuple, tmp_path) -> None:
    onnx_backend = pytest.importorskip("djpq_compiler.backends.onnx")
    pytest.importorskip("onnxruntime")
    name, _, _, converted, x = pre_act_net
    path = tmp_path / f"{name}.onnx"
    onnx_backend.export(converted, path, x)
    report = onnx_backend.verify(converted, path, x)
    assert report["max_lsb_per_op"] <= 1, report["per_op"]
    assert all(report["per_op"][n] == 0 for n in converted_record(converted).lut_ops
               if n in report["per_op"]), report["per_op"]


def test_pre_activation_net_saves_and_loads(pre_act_net: tuple, tmp_path) -> None:
    from djpq_compiler.serialize import load_converted, save_converted

    name, _, _, converted, x = pre_act_net
    loaded = load_converted(save_converted(converted, tmp_path / f"{name}.djpq"))
    assert torch.equal(loaded(x), converted(x))


def test_se_multiply_is_integer(pre_act_net: tuple) -> None:
    """The squeeze-excite ``x * gate`` of two code tensors is one ``IntMul``."""
    name, _, _, converted, _ = pre_act_net
    muls = [m for m in converted.modules() if isinstance(m, im.IntMul)]
    assert len(muls) == (1 if name.startswith("mbconv") else 0)


def test_pre_activation_layer_with_unrepresentable_bias_keeps_float_output() -> None:
    """A layer whose bias does not fit int32 at ``s_x * s_w`` (here: its input calibrated on
    zeros) cannot emit the pre-activation codes; it keeps a float output quantized before the
    table (with a warning naming it) instead of refusing the model."""
    from tiny_models import SqueezeExcite as TinySE

    model = TinySE()
    with torch.no_grad():
        model.fc1.bias.fill_(-100.0)  # relu(fc1(...)) == 0 on every input
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prepared = _prepared(model, x)
    with pytest.warns(UserWarning, match="layer fc2: its bias does not fit int32.*lookup table"):
        converted = convert(prepared)
    assert "sigmoid" in converted_record(converted).lut_ops
    assert max(integer_agreement(prepared, converted, x).values()) <= 1


def _act_quantizers(prepared: fx.GraphModule) -> dict[str, DQQuantizer]:
    paths = prepared_record(prepared).quantizers.act
    return {k: prepared.get_submodule(v) for k, v in paths.items()}


def test_pre_activation_quantizers_placement_and_spec() -> None:
    """Signed, learned, capped at 8 bits; the SE gate's output gets one too (unsigned); off
    with ``quantize_pre_activation=False``, which leaves conv + activation in float."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    on = _act_quantizers(_prepared(MBConvSE(nn.Hardswish, nn.Hardsigmoid), x))
    off_prepared = _prepared(MBConvSE(nn.Hardswish, nn.Hardsigmoid), x,
                             quantize_pre_activation=False)
    off = _act_quantizers(off_prepared)
    added = set(on) - set(off)
    assert set(off) <= set(on)
    assert added == {"djpq_gates_g0", "djpq_gates_g0_1", "djpq_gates_g0_2", "se_gate",
                     "djpq_gates_g2"}, added
    for name in added - {"se_gate"}:
        assert on[name].signed and not on[name].fixed_bits and on[name].max_bits == 8, name
    assert not on["se_gate"].signed
    assert "stem_2" in converted_record(convert(off_prepared)).float_ops


def test_pre_activation_respects_first_layer_rule_and_ignore() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    fixed = _act_quantizers(_prepared(ConvBnHardswish(), x, fix_first_last_8bit=True))
    first = fixed["djpq_gates_g0"]
    assert first.fixed_bits and first.max_bits >= 8
    assert not fixed["djpq_gates_g1"].fixed_bits
    ignored = _act_quantizers(_prepared(ConvBnHardswish(), x, ignore=("body.3",)))
    assert "body_4" not in ignored and "djpq_gates_g1" not in ignored


def test_pre_activation_adds_no_bops_and_relu_nets_unchanged() -> None:
    """The new quantizers feed no layer: BOPs are the same either way; a ReLU-only net gets
    exactly the quantizers it had."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    for make in (lambda: MBConvSE(nn.Hardswish, nn.Hardsigmoid), ConvBnHardswish):
        on, off = (_prepared(make(), x, quantize_pre_activation=flag) for flag in (True, False))
        assert djpq.bops(on).total == djpq.bops(off).total
        assert prepared_record(on).quantizers.input == prepared_record(off).quantizers.input
    relu = lambda: MBConvSE(nn.ReLU, nn.ReLU)  # noqa: E731
    on, off = (_prepared(relu(), x, quantize_pre_activation=flag) for flag in (True, False))
    assert prepared_record(on).quantizers.act == prepared_record(off).quantizers.act


def test_quantize_pre_activation_is_validated() -> None:
    with pytest.raises(djpq.ConfigError, match="quantize_pre_activation"):
        djpq.DJPQConfig(quantize_pre_activation=1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ per-op tolerance


class Island(nn.Module):
    """``Quantize(f(x))`` (or ``Quantize(x * gate)``) on continuous float input."""

    def __init__(self, fn: nn.Module | None, scale: float, signed: bool) -> None:
        super().__init__()
        self.fn, self.q = fn, im.Quantize(scale, 8, signed)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.q(self.fn(x) if self.fn is not None else x * gate)


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


#: op -> (module, exact in TVM)
ISLAND_OPS = {
    "hardswish": (nn.Hardswish(), True), "hardsigmoid": (nn.Hardsigmoid(), True),
    "relu6": (nn.ReLU6(), True), "se_mul": (None, True),
    "max_pool": (nn.MaxPool2d(3, 2, 1), True),
    "sigmoid": (nn.Sigmoid(), False), "silu": (nn.SiLU(), False), "gelu": (nn.GELU(), False),
    "gelu_tanh": (nn.GELU(approximate="tanh"), False), "tanh": (nn.Tanh(), False),
    "mean": (Mean(), False), "avg_pool": (nn.AvgPool2d(3, 2, 1, ceil_mode=True), False),
    "adaptive_avg_pool": (nn.AdaptiveAvgPool2d((2, 3)), False),
}


@pytest.mark.parametrize("op", sorted(ISLAND_OPS))
def test_island_op_tvm_tolerance(op: str) -> None:
    """Each float op on 16k continuous inputs, quantized to 8 bits at a fine scale: TVM equals
    the reference bit for bit for the correctly rounded ops, within 1 LSB (and on almost every
    code exactly) for the rest."""
    fn, exact = ISLAND_OPS[op]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 32, 32, generator=gen) * 3
    gate = torch.rand(1, 16, 1, 1, generator=gen)
    gm = im.trace_integer(Island(fn, 6.0 / 127 / 8, True))
    model = tvm_backend.build(gm, "x86", example_inputs=(x, gate))
    got, want = model(x, gate), gm(x, gate)
    diff = (got - want).abs()
    if exact:
        assert torch.equal(got, want), op
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3, op


def test_unsupported_reason_names_the_op() -> None:
    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(torch.special.erfc(self.dq(self.q(x))))

        def __init__(self) -> None:
            super().__init__()
            self.q, self.dq = im.Quantize(0.1, 8, True), im.Dequantize(0.1)

    gm = im.trace_integer(Odd())
    (node, why), = tvm_backend.unsupported_nodes(gm)
    assert "erfc" in why and "between Dequantize and Quantize" in why


# ------------------------------------------------------------------------------ torchvision


tv = pytest.importorskip("torchvision")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_y_400mf", "efficientnet_b1",
                                  "squeezenet1_1"])
def test_torchvision_island_nets_build_with_tvm(name: str) -> None:
    """Squeeze-excite nets (hardswish/hardsigmoid, sigmoid gates, SiLU, stochastic depth) run
    entirely in integers (tables, IntMul) and build for x86 bit-exact; squeezenet's float ReLU +
    pool tail builds, close to the reference (1 ulp measured)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    prepared = _prepared(tv.models.get_model(name, weights=None), x)
    converted = convert(prepared)
    model = tvm_backend.build(converted, "x86", example_inputs=x)
    got, want = model(x), converted(x)
    assert got.shape == want.shape
    if name != "squeezenet1_1":
        assert converted_record(converted).float_ops == () and converted_record(converted).lut_ops
        assert torch.equal(got, want)
    assert math.isfinite(float(got.abs().max()))
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max()) + 1e-6

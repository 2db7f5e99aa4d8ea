"""The AMX-INT8 conv kernel (``backends/tvm/kernels/amx.py``): bit-exact at its bound and one bit
past it (the selector then picks a safe variant), odd pruned channel counts, batch 1 and 32,
strides, 1x1, dilation, float output, packed layouts between layers; the selection on targets
with and without AMX (compile-only where the CPU has no AMX)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.ir import modules as im

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
from djpq_compiler.backends.tvm import adapter  # noqa: E402
from djpq_compiler.backends.tvm.emit import lower  # noqa: E402
from djpq_compiler.backends.tvm.kernels import amx  # noqa: E402
from djpq_compiler.backends.tvm.kernels.conv2d import ConvKernelSpec  # noqa: E402
from djpq_compiler.backends.tvm.kernels.emit import target_features  # noqa: E402
from djpq_compiler.backends.tvm.kernels.select import LayerFacts, select_kernel  # noqa: E402
from tests.test_tvm_kernels import One, check, compile_for, inputs, int_layer  # noqa: E402

AMX = {"kind": "llvm", "mcpu": adapter.system_cpu(), "mattr": ["+amx-tile", "+amx-int8"]}
HOST_AMX = amx.cpu_has_amx() and amx.request_amx()
needs_amx = pytest.mark.skipif(
    not HOST_AMX, reason="this CPU reports no AMX-INT8 (amx_tile/amx_int8 in /proc/cpuinfo) or "
                         "Linux refused the tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
NO_AMX_TARGETS = [{"kind": "llvm", "mcpu": "cascadelake"}, {"kind": "llvm", "mcpu": "haswell"},
                  {"kind": "llvm", "mcpu": "icelake-server"}]

@pytest.fixture
def amx_from_16(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMX for every dense layer of >= 16 channels, whatever its layouts: the exactness tests
    run single NCHW layers of odd pruned widths through the AMX kernel (the speed thresholds
    are tested in :func:`test_selection_with_amx_by_bits_and_shape`)."""
    from djpq_compiler.backends.tvm.kernels import select

    for name in ("AMX_MIN_NCHW", "AMX_MIN_PACKED"):
        monkeypatch.setattr(select, name, {"channels": 16, "reduce": 16})


#: (activation bits, signed, weight bits) -> variant, each next to one bit past the bound
#: (u8 operands after the offset, |w| <= 127; past either, int16 operands are the safe ones).
AMX_LADDER = [
    (8, False, 4, "amx_int8"),
    (8, False, 8, "amx_int8"),  # W8A8: tdpbusd sums at full width, no saturation
    (8, True, 8, "amx_int8"),  # signed 8-bit codes shifted by +128: span 255
    # one bit past either, int16 operands (this 3x3 stride-1 conv: through Winograd)
    (9, False, 8, "avx2_wino_s16"),  # one bit past u8 activations
    (8, False, 9, "avx2_wino_s16"),  # one bit past int8 weights
    (9, True, 4, "avx2_wino_s16"),  # signed 9-bit: span 511
]


@needs_amx
@pytest.mark.parametrize(("x_bits", "signed", "w_bits", "variant"), AMX_LADDER)
def test_amx_exact_at_and_past_its_bound(x_bits: int, signed: bool, w_bits: int,
                                         variant: str, amx_from_16: None) -> None:
    layer = int_layer("conv", 37, 41, x_bits=x_bits, w_bits=w_bits, x_signed=signed, seed=w_bits)
    _, records = check(layer, (1, 37, 9, 10), x_bits, signed, AMX)
    assert [r.variant for r in records] == [variant]
    if variant == "amx_int8":
        assert "tdpbusd" in records[0].bound and "<= 2^31-1" in records[0].bound


@needs_amx
@pytest.mark.parametrize(("c_in", "c_out", "k", "stride", "padding", "dilation", "batch", "hw"), [
    (16, 16, 3, 1, 1, 1, 1, (5, 5)),  # the smallest AMX layer: 16 channels, 25 pixels
    (29, 19, 3, 1, 1, 1, 32, (9, 10)),  # odd pruned counts, batch 32
    (70, 40, 3, 2, 1, 1, 2, (15, 13)),  # two input blocks (70 -> 128), stride 2: 4 phases
    (33, 17, 1, 1, 0, 1, 1, (7, 9)),  # 1x1
    (33, 50, 1, 2, 0, 1, 32, (11, 9)),  # 1x1 stride 2: one phase (subsampled pack)
    (24, 35, 5, 2, 2, 1, 1, (12, 11)),  # 5x5 stride 2
    (21, 18, 3, 1, 2, 2, 2, (9, 8)),  # dilation 2
    (130, 33, 3, 1, 0, 1, 1, (6, 7)),  # no padding, three input blocks
])
def test_amx_conv_shapes_exact(c_in: int, c_out: int, k: int, stride: int, padding: int,
                               dilation: int, batch: int, hw: tuple[int, int],
                               amx_from_16: None) -> None:
    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=5, k=k, stride=stride,
                      padding=padding, dilation=dilation, seed=c_in + k)
    _, records = check(layer, (batch, c_in) + hw, 8, spec=AMX)
    assert records[0].variant == "amx_int8", records[0].note


@needs_amx
def test_amx_float_output_and_acc_shift(amx_from_16: None) -> None:
    """A float-output layer (the int32 accumulator out) and a layer with ``acc_shift``."""
    for layer, bits in ((int_layer("conv", 23, 20, x_bits=8, w_bits=4, out_scale=None), 8),
                        (int_layer("conv", 23, 20, x_bits=6, w_bits=3, acc_shift=3), 6)):
        _, records = check(layer, (2, 23, 6, 7), bits, spec=AMX)
        assert records[0].variant == "amx_int8"


@needs_amx
@pytest.mark.parametrize("batch", [1, 32])
def test_amx_linear_exact(batch: int, amx_from_16: None) -> None:
    """2-D linears run as a 1x1 conv over the batch: AMX from 16 rows, VNNI below."""
    layer = int_layer("linear", 45, 17, x_bits=8, w_bits=8, seed=batch)
    _, records = check(layer, (batch, 45), 8, spec=AMX)
    want = "amx_int8" if batch >= 16 else "avx512_vnni"
    assert [(r.op, r.variant) for r in records] == [("linear", want)]
    if batch < 16:
        assert "AMX not used" in records[0].note


class TwoConvs(nn.Module):
    """Quantize -> conv -> conv: the middle value is planned packed (``NCHW16c``)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(self.quant(x)))


@needs_amx
@pytest.mark.parametrize("batch", [1, 32])
def test_amx_packed_layout_between_layers(batch: int, amx_from_16: None) -> None:
    """The first conv writes ``NCHW16c`` (padding lanes included: 35 of 48), the second reads
    it (signed codes, offset +128) and writes NCHW; bit-exact against the reference."""
    first = int_layer("conv", 24, 35, x_bits=8, w_bits=4, seed=1)
    second = int_layer("conv", 35, 27, x_bits=8, w_bits=6, x_signed=True, stride=2, seed=2)
    gm = im.trace_integer(TwoConvs(first, second).eval())
    xs = inputs((batch, 24, 11, 12), 8, False)
    run, kernels = compile_for(gm, xs[0], AMX)
    for x in xs:
        assert torch.equal(run(x), gm(x))
    layouts = [(k.variant, k.in_layout, k.out_layout) for k in kernels]
    assert layouts == [("amx_int8", "NCHW", "NCHW16c"), ("amx_int8", "NCHW16c", "NCHW")]


@needs_amx
def test_build_for_this_cpu_picks_amx_and_reports_it() -> None:
    """``build(..., "x86")`` on an AMX CPU targets AMX and names the variant per layer."""
    layer = int_layer("conv", 64, 32, x_bits=8, w_bits=4)
    gm = im.trace_integer(One(layer, 8, False).eval())
    x = inputs((1, 64, 8, 8), 8, False)
    model = tvm_backend.build(gm, "x86", example_inputs=x[0])
    for t in x:
        assert torch.equal(model(t), gm(t))
    assert model.kernels[0].variant == "amx_int8"
    assert "amx_int8" in model.kernel_report()


def _facts(features: frozenset[str] | None, c_in: int = 64, pixels: int = 196, groups: int = 1,
           w_max: int = 7, act: tuple[int, int] = (0, 255), packed: bool = False,
           k: int = 3) -> LayerFacts:
    weight = np.full((32, c_in // groups, k, k), w_max, np.int64)
    return LayerFacts("conv", "conv2d", act[0], act[1], weight, np.zeros(32, np.int64), 0,
                      groups, pixels * weight.size, features, "test", packed)


VNNI_FEATURES = frozenset({"avx2", "avx512bw", "avx512vnni"})
AMX_FEATURES = VNNI_FEATURES | {"amx-int8"}


def test_selection_without_amx_never_picks_it() -> None:
    for spec in NO_AMX_TARGETS:
        features = target_features(spec)
        assert features is not None and "amx-int8" not in features
        assert select_kernel(_facts(features)).variant != "amx_int8"
    assert select_kernel(_facts(VNNI_FEATURES)).variant == "avx512_vnni"


def test_selection_with_amx_by_bits_and_shape() -> None:
    assert "amx-int8" in (target_features(AMX) or ())
    assert "amx-int8" in (target_features({"kind": "llvm", "mcpu": "sapphirerapids"}) or ())
    assert select_kernel(_facts(AMX_FEATURES)).variant == "amx_int8"
    assert select_kernel(_facts(AMX_FEATURES, w_max=127)).variant == "amx_int8"
    assert select_kernel(_facts(AMX_FEATURES, act=(-128, 127))).variant == "amx_int8"
    # one bit past: 128 does not fit int8 weights; span 256 not u8
    assert select_kernel(_facts(AMX_FEATURES, w_max=128)).variant == "avx2_s16"
    assert select_kernel(_facts(AMX_FEATURES, act=(0, 256))).variant == "avx2_s16"
    # packed in and out: from 32 channels; NCHW in or out: from 64
    assert select_kernel(_facts(AMX_FEATURES, c_in=32, packed=True)).variant == "amx_int8"
    # shapes AMX does not pay for keep VNNI, with the reason recorded
    for facts, why in ((_facts(AMX_FEATURES, c_in=31, packed=True), "31 input channels < 32"),
                       (_facts(AMX_FEATURES, c_in=63), "63 input channels < 64"),
                       (_facts(AMX_FEATURES, c_in=64, k=1), "64 products per output < 576"),
                       (_facts(AMX_FEATURES, c_in=64, k=1, packed=True),
                        "64 products per output < 128"),
                       (_facts(AMX_FEATURES, pixels=15), "output pixels"),
                       (_facts(AMX_FEATURES, pixels=2**27), "int32"),
                       (_facts(AMX_FEATURES, groups=2), "dense only")):
        choice = select_kernel(facts)
        assert choice.variant == "avx512_vnni" and "AMX not used" in choice.note
        assert why in choice.note


@pytest.mark.parametrize("spec", NO_AMX_TARGETS + [AMX])
def test_compile_only_selection_per_target(spec: dict) -> None:
    """Lower and compile (not run) a 64-channel conv for each target: AMX exactly where the
    target dict has amx-int8 (AVX2 alone: Winograd F(4x4, 3x3), the 3x3 conv's 8x8 output and 64
    channels pass its speed rule); the AMX build's machine code has ``tdpbusd``."""
    layer = int_layer("conv", 64, 64, x_bits=8, w_bits=4)
    gm = im.trace_integer(One(layer, 8, False).eval())
    mod, ctx = lower(gm, [torch.zeros(1, 64, 8, 8)], spec)
    has_amx = "amx-int8" in spec.get("mattr", [""])[-1]
    assert ctx.kernels[0].variant == ("amx_int8" if has_amx else
                                      "avx2_wino4_s16" if spec["mcpu"] == "haswell"
                                      else "avx512_vnni")
    adapter.compile_module(mod, adapter.make_target(spec))
    if has_amx:
        tvm = adapter.load_tvm()
        spec_k = ConvKernelSpec(1, 64, 8, 8, 64, (3, 3), (1, 1), (1, 1), (1, 1), "amx", 1,
                                "uint8", 0, 0, "int32", 0, 0, "int32")
        func, _ = amx.build_amx_kernel(spec_k)
        asm = tvm.compile(func, target=adapter.make_target(spec)).mod.inspect_source("asm")
        for instruction in ("ldtilecfg", "tileloadd", "tdpbusd", "tilestored"):
            assert instruction in asm


def test_amx_plan_geometry() -> None:
    """Phases and tap offsets: stride 2 3x3 reads 4 phases, 1x1 stride 2 one; every tap of a
    valid output stays inside the packed rows."""
    def spec(k: int, s: int, p: int, hw: int = 14, oc: int = 40) -> ConvKernelSpec:
        return ConvKernelSpec(1, 70, hw, hw, oc, (k, k), (s, s), (p, p), (1, 1), "amx", 1,
                              "uint8", 0, 0, "int32", 0, 0, "int32")
    for k, s, p, phases in ((3, 1, 1, 1), (3, 2, 1, 4), (1, 2, 0, 1), (1, 1, 0, 1)):
        sp = spec(k, s, p)
        plan = amx.amx_plan(sp)
        assert len(plan.phases) == phases and plan.in_blocks == 2
        oh, ow = sp.out_size
        last = (oh - 1) * plan.wq + ow - 1 + max(off for _, off in plan.taps)
        assert last < plan.hq * plan.wq
        assert plan.m_tiles * plan.pixels + max(off for _, off in plan.taps) <= plan.hq * plan.wq
        assert plan.out_blocks % plan.tile_n == 0 and plan.out_blocks * 16 >= sp.out_channels


class ThreeConvs(nn.Module):
    """Quantize -> conv -> conv -> conv: the middle conv reads and writes ``NCHW16c``."""

    def __init__(self, *convs: nn.Module) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.convs = nn.Sequential(*convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.quant(x))


@needs_amx
def test_amx_chosen_from_the_layouts_in_a_network() -> None:
    """Default thresholds: 40 channels take AMX where the conv reads and writes packed values,
    VNNI where it reads the graph's NCHW input or writes NCHW (the reason recorded)."""
    convs = [int_layer("conv", 40, 40, x_bits=8, w_bits=4, x_signed=i > 0, seed=i)
             for i in range(3)]
    gm = im.trace_integer(ThreeConvs(*convs).eval())
    xs = inputs((2, 40, 9, 9), 8, False)
    run, kernels = compile_for(gm, xs[0], AMX)
    for x in xs:
        assert torch.equal(run(x), gm(x))
    got = [(k.variant, k.in_layout, k.out_layout) for k in kernels]
    assert got == [("avx512_vnni", "NCHW", "NCHW16c"), ("amx_int8", "NCHW16c", "NCHW16c"),
                   ("avx512_vnni", "NCHW16c", "NCHW")]
    assert "40 input channels < 64 (NCHW in or out" in kernels[0].note
    assert "packed in and out" in kernels[1].note


def test_amx_kernel_refuses_int32_overflowing_sizes() -> None:
    """Offsets are int32: a call whose pack or output passes 2^31 is refused with the fix."""
    from djpq_compiler.errors import BackendError

    huge = ConvKernelSpec(4096, 512, 224, 224, 64, (3, 3), (1, 1), (1, 1), (1, 1), "amx", 1,
                          "uint8", 0, 0, "int32", 0, 0, "int32")
    with pytest.raises(BackendError, match="smaller batch"):
        amx.build_amx_kernel(huge)


def test_small_amx_kernels_run_on_the_calling_thread() -> None:
    """The AMX kernel follows the thread rule of the other conv kernels (``runs_parallel``): a
    batch-1 layer of a small net has no parallel loop; a resnet18-size one keeps both."""
    pytest.importorskip("tvm")
    from djpq_compiler.backends.tvm.kernels.amx import build_amx_kernel
    from djpq_compiler.backends.tvm.kernels.conv2d import ConvKernelSpec, runs_parallel

    def spec(batch: int, hw: int) -> ConvKernelSpec:
        return ConvKernelSpec(batch, 64, hw, hw, 64, (3, 3), (1, 1), (1, 1), (1, 1), "amx", 1,
                              "uint8", 0, 0, "int8", -127, 127, in_lanes=16, out_lanes=16)

    small, large = spec(1, 7), spec(1, 56)
    assert not runs_parallel(small) and runs_parallel(large)
    assert "T.parallel" not in build_amx_kernel(small)[0].script()
    assert build_amx_kernel(large)[0].script().count("T.parallel") == 2  # pack and conv

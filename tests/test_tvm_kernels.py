"""Written integer kernels of the TVM backend: bit-exact at every variant's bound and one bit past
it, odd pruned channel counts, batch 1 and 32, strides and padding, and the per-layer records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.ir import modules as im
from djpq_compiler.ir import qrange, requant_params

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
kernels = pytest.importorskip("djpq_compiler.backends.tvm.kernels")
from djpq_compiler.backends.tvm import adapter  # noqa: E402
from djpq_compiler.backends.tvm.build import target_spec  # noqa: E402
from djpq_compiler.backends.tvm.emit import lower  # noqa: E402
from djpq_compiler.backends.tvm.kernels.emit import target_features  # noqa: E402
from djpq_compiler.backends.tvm.kernels.select import LayerFacts, select_kernel  # noqa: E402

IN_SCALE = 0.02
AVX2 = {"kind": "llvm", "mcpu": "haswell"}  # AVX2, no AVX-512 (the developers' znver3 class)
VNNI = {"kind": "llvm", "mcpu": "cascadelake"}  # AVX512-VNNI
HOST = target_spec("x86")[0]
HOST_VNNI = "avx512vnni" in (target_features(HOST) or ())
needs_vnni = pytest.mark.skipif(not HOST_VNNI, reason="this CPU has no AVX512-VNNI")
TARGETS = [pytest.param(AVX2, id="avx2"), pytest.param(VNNI, id="vnni", marks=needs_vnni)]


def int_layer(kind: str, c_in: int, c_out: int, *, x_bits: int, w_bits: int, x_signed: bool = False,
              k: int = 3, stride: int = 1, padding: int = 1, groups: int = 1,
              out_scale: float | None = 1.0, acc_shift: int = 0, dilation: int = 1,
              seed: int = 0, out_bits: int = 8, out_signed: bool = True) -> nn.Module:
    """A conv/linear whose weights reach ``+-max`` of ``w_bits`` (the selection's worst case),
    requantizing to ``out_bits`` codes (``out_signed``) unless ``out_scale`` is None."""
    gen = torch.Generator().manual_seed(seed)
    wmin, wmax = qrange(w_bits, True)
    shape = (c_out, c_in // groups, k, k) if kind == "conv" else (c_out, c_in)
    weight = torch.randint(wmin, wmax + 1, shape, generator=gen)
    weight.view(c_out, -1)[:, 0] = wmax
    weight.view(c_out, -1)[0, -1] = wmin
    w_scale = 0.01 + 0.02 * torch.rand(c_out, generator=gen, dtype=torch.float64)
    bias = torch.randint(-300, 301, (c_out,), generator=gen)
    x_max = qrange(x_bits, x_signed)[1]
    fan_in = weight[0].numel()
    real_out = None if out_scale is None else \
        IN_SCALE * 0.02 * x_max * max(abs(wmin), wmax) * fan_in ** 0.5 / 20
    bound = fan_in * (2 * x_max + 1) * wmax * 2 ** acc_shift + 300
    m, shift = requant_params(IN_SCALE, w_scale / 2 ** acc_shift, real_out or 1.0, bound)
    common = dict(weight=weight, bias=bias, w_scale=w_scale, in_scale=IN_SCALE, w_bits=w_bits,
                  out_scale=real_out, out_bits=out_bits, out_signed=out_signed, clip=None,
                  m=m, shift=shift,
                  acc_shift=acc_shift)
    if kind == "linear":
        return im.IntLinear(**common)
    return im.IntConv2d(stride=(stride, stride), padding=(padding, padding),
                        dilation=(dilation, dilation), groups=groups, **common)


class One(nn.Module):
    """Quantize -> one integer layer (-> Dequantize when the layer has a float output)."""

    def __init__(self, layer: nn.Module, x_bits: int, x_signed: bool) -> None:
        super().__init__()
        self.quant = im.Quantize(IN_SCALE, x_bits, x_signed)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.quant(x))


def depthwise_variant(spec: dict, layer: nn.Module, x_bits: int, signed: bool) -> str:
    """The depthwise variant the selection must pick: ``_acc16`` exactly when every int16 tap
    sum is bounded, ``span * max_c sum|w_c| <= 32767``."""
    lo, hi = qrange(x_bits, signed)
    taps = layer.weight.reshape(layer.weight.shape[0], -1).abs().sum(1).max().item()
    base = "avx2_dw8" if spec is AVX2 else "avx512_dw16"
    return base + ("_acc16" if (hi - min(lo, 0)) * taps <= 32767 else "")


def inputs(shape: tuple[int, ...], x_bits: int, signed: bool, seed: int = 0) -> list[torch.Tensor]:
    """Random codes over the whole range, plus the worst case (every code at its extreme)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = qrange(x_bits, signed)
    rand = (torch.rand(shape, generator=gen) * (hi - lo + 1) + lo) * IN_SCALE
    worst = torch.full(shape, hi * IN_SCALE * 2)
    return [rand, worst] + ([torch.full(shape, lo * IN_SCALE * 2)] if signed else [])


def compile_for(gm: torch.fx.GraphModule, x: torch.Tensor, spec: dict) -> tuple:
    """Lower for the target dict ``spec`` (not necessarily this CPU's), compile, wrap the VM."""
    mod, ctx = lower(gm, [x], spec)
    vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(spec)))

    def run(t: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(adapter.run_vm(vm, [t.numpy()])[0])
        return out.to(torch.int64) if ctx.output_kinds[0] == "int" else out
    return run, ctx.kernels


def check(layer: nn.Module, shape: tuple[int, ...], x_bits: int, x_signed: bool = False,
          spec: dict | None = None) -> tuple:
    """Build ``layer`` behind a Quantize, assert bit-exactness on random and worst-case codes."""
    gm = im.trace_integer(One(layer, x_bits, x_signed).eval())
    xs = inputs(shape, x_bits, x_signed)
    run, records = compile_for(gm, xs[0], AVX2 if spec is None else spec)
    for x in xs:
        want, got = gm(x), run(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), (got - want).abs().max()
    assert len(torch.unique(gm(xs[0]))) > 3  # the requantization does not clip everything
    return run, records


#: (activation bits, signed, weight bits) -> variant; each line next to one bit past its bound.
LADDER = [
    (8, False, 4, "avx2_u8s8_p4"),  # 2*4*255*7 = 14280
    (8, False, 5, "avx2_u8s8_p4"),  # 2*4*255*15 = 30600 (the P = 4 bound's last bit)
    (8, False, 6, "avx2_u8s8_p2"),  # 2*4*255*31 > 32767; 2*2*255*31 = 31620
    # 2*2*255*63 > 32767; 2*1*255*63 = 32130: P = 1, but this 3x3 stride-1 conv takes Winograd
    (8, False, 7, "avx2_wino_s16"),
    # 2*1*255*127 > 32767: W8A8 widens to int16, a 3x3 stride-1 conv through Winograd
    # (test_tvm_kernels_winograd.py: its own bounds, and avx2_s16 at other geometries)
    (8, False, 8, "avx2_wino_s16"),
    (7, True, 4, "avx2_u8s8_p4"),  # signed 7-bit shifted by +64: span 127
    (8, True, 5, "avx2_u8s8_p4"),  # signed 8-bit shifted by +128: span 255
    (8, True, 8, "avx2_wino_s16"),
    (10, False, 4, "avx2_wino_s16"),  # activations past 8 bits
]


@pytest.mark.parametrize(("x_bits", "signed", "w_bits", "variant"), LADDER)
def test_conv_variant_exact_at_and_past_its_bound(x_bits: int, signed: bool, w_bits: int,
                                                  variant: str) -> None:
    # 29 input channels pad to 32 with P = 4, 2 and 1 alike: the bound alone decides P
    layer = int_layer("conv", 29, 19, x_bits=x_bits, w_bits=w_bits, x_signed=signed, seed=w_bits)
    _, records = check(layer, (1, 29, 9, 10), x_bits, signed)
    assert [r.variant for r in records] == [variant]
    assert records[0].bound != "-" and records[0].op == "conv2d"


VNNI_LADDER = [
    (8, False, 4, "avx512_vnni"),
    (8, False, 8, "avx512_vnni"),  # W8A8: vpdpbusd does not saturate
    (8, True, 8, "avx512_vnni"),  # signed 8-bit shifted by +128
    (9, False, 8, "avx2_s16"),  # one bit past u8: int16 operands (21 channels: no Winograd)
]


@needs_vnni
@pytest.mark.parametrize(("x_bits", "signed", "w_bits", "variant"), VNNI_LADDER)
def test_vnni_variant_exact_at_and_past_its_bound(x_bits: int, signed: bool, w_bits: int,
                                                  variant: str) -> None:
    layer = int_layer("conv", 21, 37, x_bits=x_bits, w_bits=w_bits, x_signed=signed, seed=w_bits)
    _, records = check(layer, (1, 21, 9, 10), x_bits, signed, VNNI)
    assert [r.variant for r in records] == [variant]


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("c_in", "c_out", "k", "stride", "padding", "batch", "hw", "p"), [
    (1, 1, 3, 1, 1, 1, (5, 5), 0),
    (3, 37, 3, 2, 1, 32, (9, 8), 1),  # taps x channels jointly: 27 pad to 28 with P = 1
    (37, 3, 1, 1, 0, 1, (7, 13), 4),
    (13, 9, 3, 2, 0, 2, (11, 11), 4),
    (8, 16, 5, 1, 2, 1, (6, 17), 2),  # 8 channels per tap: P = 2 pads none, P = 4 to 16
    # strided 1x1 (resnet shortcuts): the pack holds every other pixel (conv2d.subsamples);
    # odd sizes, and a padded one (the padding ring is read at odd offsets)
    (13, 31, 1, 2, 0, 32, (15, 14), 4),
    (6, 10, 1, 3, 1, 2, (10, 11), 4),
])
def test_conv_odd_channels_batch_stride_padding(c_in: int, c_out: int, k: int, stride: int,
                                               padding: int, batch: int, hw: tuple, p: int,
                                               spec: dict) -> None:
    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=4, k=k, stride=stride,
                      padding=padding, seed=c_in)
    _, records = check(layer, (batch, c_in) + hw, 8, spec=spec)
    if c_in == c_out == 1:  # a 1 -> 1 conv is depthwise: the channels-in-lanes kernel
        assert records[0].variant == depthwise_variant(spec, layer, 8, False)
    elif spec is AVX2:
        assert records[0].variant == f"avx2_u8s8_p{p}"
    else:  # 3 outputs of 16 lanes at stride 1: pixels in lanes (select.narrow_pixels)
        narrow = (c_out, stride) == (3, 1)
        assert records[0].variant == ("avx512_px16" if narrow else "avx512_vnni")


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("channels", "x_bits", "signed", "w_bits", "k", "stride", "batch"), [
    (37, 8, False, 8, 3, 1, 1), (21, 8, True, 4, 3, 2, 32), (3, 12, False, 9, 5, 1, 2),
])
def test_depthwise_exact(channels: int, x_bits: int, signed: bool, w_bits: int, k: int,
                         stride: int, batch: int, spec: dict) -> None:
    layer = int_layer("conv", channels, channels, x_bits=x_bits, w_bits=w_bits, x_signed=signed,
                      k=k, stride=stride, padding=k // 2, groups=channels, seed=channels)
    _, records = check(layer, (batch, channels, 9, 8), x_bits, signed, spec)
    assert records[0].variant == depthwise_variant(spec, layer, x_bits, signed)


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("last_tap", "acc16"), [(8, True), (9, False)])
def test_depthwise_int16_sums_at_the_bound_and_one_past(spec: dict, last_tap: int,
                                                        acc16: bool) -> None:
    """3x3 taps of one sign summing to 128 (255 * 128 = 32640 <= 32767: int16 sums) and to 129
    (32895: one past, the selection must keep int32 sums); bit-exact on the worst-case input
    (every code 255, where the 129 case's tap sum would overflow int16)."""
    layer = int_layer("conv", 5, 5, x_bits=8, w_bits=5, groups=5, seed=7)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([15] * 8 + [last_tap]).view(1, 1, 3, 3).repeat(5, 1, 1, 1))
        layer.weight[3] *= -1
    _, records = check(layer, (2, 5, 6, 7), 8, False, spec)
    assert records[0].variant.endswith("_acc16") == acc16
    assert records[0].variant == depthwise_variant(spec, layer, 8, False)


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("c_in", "c_out", "groups", "x_bits", "w_bits", "out_scale"), [
    (16, 32, 2, 8, 4, 1.0), (12, 24, 3, 8, 7, None), (20, 40, 5, 6, 8, 1.0),
])
def test_grouped_conv_in_one_kernel(c_in: int, c_out: int, groups: int, x_bits: int,
                                    w_bits: int, out_scale: float | None, spec: dict) -> None:
    layer = int_layer("conv", c_in, c_out, x_bits=x_bits, w_bits=w_bits, groups=groups,
                      out_scale=out_scale, stride=2, seed=groups)
    _, records = check(layer, (2, c_in, 9, 8), x_bits, spec=spec)
    assert records[0].variant != "default"
    assert f"{groups} groups in one kernel" in records[0].note


@pytest.mark.parametrize(("c_in", "c_out", "stride", "padding"), [
    (3, 3, 1, 0), (16, 32, 2, 0), (5, 5, 1, 1),  # channel multiplier 2, stride 2, padding
    (1, 6, 1, 0),  # a dense 1x1 conv of one input channel: the same TVM pattern
])
@pytest.mark.parametrize("target", [None, "cuda-emulated"])
def test_generic_lowering_of_1x1_depthwise_adds_the_bias_once(c_in: int, c_out: int,
                                                              stride: int, padding: int,
                                                              target: str | None) -> None:
    """TVM 0.27 compiles an integer 1x1 ``nn.conv2d`` with one input channel per group fused
    with the bias ``add`` after it into a kernel that adds the bias twice (a silent wrong
    answer the fuzzer found through ``build(..., "cuda-emulated")``). The generic lowering --
    builds without a target (tuning, inspection) and CUDA's depthwise layers -- computes such a
    layer as per-channel products instead (``converters._depthwise_1x1``): bit-exact with every
    multiplier, stride and padding, on signed codes."""
    from djpq_compiler.backends import tvm as tvm_backend

    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=4, x_signed=True, k=1,
                      stride=stride, padding=padding, groups=c_in, seed=c_out)  # c_in 1: dense
    gm = im.trace_integer(One(layer, 8, True).eval())
    xs = inputs((2, c_in, 7, 6), 8, True)
    if target is None:
        mod, ctx = lower(gm, [xs[0]], None)
        vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(AVX2)))
        run = lambda t: torch.from_numpy(adapter.run_vm(vm, [t.numpy()])[0])  # noqa: E731
        kernels = ctx.kernels
    else:
        model = tvm_backend.build(gm, target, example_inputs=xs[0])
        run, kernels = model, model.kernels
    # CUDA takes a channel multiplier as a grouped conv (4 groups merged: its dp4a kernel)
    generic = target is None or c_out == c_in
    assert [k.variant for k in kernels] == (["default"] if generic else ["cuda_dp4a"])
    for x in xs:
        want = gm(x)
        assert torch.equal(run(x).to(want.dtype), want)


@pytest.mark.parametrize(("stride", "padding", "ceil_mode"), [
    (2, 0, False), (2, 0, True), (1, 0, False), (3, 0, True),
])
def test_1x1_average_pool_window_sums_exact_in_the_generic_lowering(
        stride: int, padding: int, ceil_mode: bool) -> None:
    """A 1x1 average pool (a strided subsample) sums its windows without the 1x1 depthwise
    ``conv2d`` that TVM 0.27 miscompiles when an add follows: equal to the reference, on signed
    codes, in a build without a target (NCHW, the generic lowering)."""

    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = im.Quantize(1.0, 8, True)
            self.pool = im.IntAvgPool2d((1, 1), (stride, stride), (padding, padding), ceil_mode,
                                        True, None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.q(x))

    gm = im.trace_integer(Pool().eval())
    x = torch.randint(-128, 128, (2, 3, 7, 8), generator=torch.Generator().manual_seed(2))
    mod, _ = lower(gm, [x.float()], None)
    vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(AVX2)))
    got = torch.from_numpy(adapter.run_vm(vm, [x.float().numpy()])[0])
    want = gm(x.float())
    assert torch.equal(got.to(want.dtype), want)


@pytest.mark.parametrize("groups", [1, 6])
def test_dilated_conv_exact(groups: int) -> None:
    layer = int_layer("conv", 6, 6 if groups > 1 else 11, x_bits=8, w_bits=4, padding=2,
                      dilation=2, groups=groups, seed=groups)
    _, records = check(layer, (2, 6, 10, 9), 8)
    assert records[0].variant == ("avx2_u8s8_p2" if groups == 1  # 6 channels: 8, not 16
                                  else depthwise_variant(AVX2, layer, 8, False))


def test_conv_float_output_and_acc_shift() -> None:
    """A float-output layer (end of the integer region) and a layer with ``acc_shift``."""
    for layer, variant in ((int_layer("conv", 11, 10, x_bits=8, w_bits=4, out_scale=None),
                            "avx2_u8s8_p4"),
                           # 63 * max sum|w| <= 32767: pixels in lanes (conv2d_narrow.py)
                           (int_layer("conv", 11, 10, x_bits=6, w_bits=3, acc_shift=3),
                            "avx2_px16")):
        _, records = check(layer, (2, 11, 6, 7), 8 if layer.out_scale is None else 6)
        assert records[0].variant == variant


@pytest.mark.parametrize(("batch", "w_bits", "variant"), [
    (1, 4, "avx2_u8s8_p4"), (32, 4, "avx2_u8s8_p4"), (32, 8, "avx2_s16"), (3, 7, "avx2_u8s8_p1"),
    pytest.param(32, 8, "avx512_vnni", marks=needs_vnni),
])
def test_linear_exact(batch: int, w_bits: int, variant: str) -> None:
    layer = int_layer("linear", 45, 17, x_bits=8, w_bits=w_bits, seed=batch)
    _, records = check(layer, (batch, 45), 8, spec=VNNI if variant == "avx512_vnni" else AVX2)
    assert [(r.op, r.variant) for r in records] == [("linear", variant)]


def test_build_for_this_cpu_uses_its_best_kernel() -> None:
    """``build(..., "x86")`` picks from this CPU's features and records it."""
    gm = im.trace_integer(One(int_layer("conv", 6, 9, x_bits=8, w_bits=8), 8, False).eval())
    x = inputs((2, 6, 7, 7), 8, False)
    model = tvm_backend.build(gm, "x86", example_inputs=x[0])
    for t in x:
        assert torch.equal(model(t), gm(t))
    # 9 outputs: VNNI's 16 channel lanes pad 1.38x the pixel lanes' work (select.narrow_pixels)
    assert model.kernels[0].variant == ("avx512_px16" if HOST_VNNI else "avx2_s16")
    assert model.kernels[0].variant in model.kernel_report()


def test_fallbacks_are_recorded() -> None:
    """Grouped conv, int64 accumulators, non-AVX2 targets, aarch64 without dotprod or depthwise:
    default, with the reason."""
    # 3 groups of 2 -> 2: even merged (test_narrow_groups_merge_block_diagonally) below 8 outputs
    grouped = int_layer("conv", 6, 6, x_bits=8, w_bits=4, groups=3)
    _, records = check(grouped, (1, 6, 6, 6), 8)
    assert records[0].variant == "default" and "per group" in records[0].note
    wide = int_layer("conv", 4, 3, x_bits=16, w_bits=16, k=1, padding=0)
    _, records = check(wide, (1, 4, 3, 3), 16)
    assert records[0].variant == "default" and "int64" in records[0].note
    gm = im.trace_integer(One(int_layer("conv", 5, 6, x_bits=8, w_bits=4), 8, False).eval())
    x = torch.rand(1, 5, 6, 6)
    _, ctx = lower(gm, [x], {"kind": "llvm", "mcpu": "x86-64"})
    assert ctx.kernels[0].variant == "default" and "no AVX2" in ctx.kernels[0].note
    arm_plain = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}  # no dotprod
    _, ctx = lower(gm, [x], arm_plain)
    assert ctx.kernels[0].variant == "default" and "no AVX2" in ctx.kernels[0].note
    model = tvm_backend.build(gm, "aarch64", example_inputs=x)  # +dotprod: see test_tvm_kernels_arm
    assert model.kernels[0].variant == "neon_sdot"
    # aarch64 depthwise takes neon_dw8 up to int16 operands (test_tvm_kernels_arm); 16-bit codes
    # are one bit past it
    depthwise = int_layer("conv", 6, 6, x_bits=16, w_bits=4, groups=6)
    gm = im.trace_integer(One(depthwise, 16, False).eval())
    model = tvm_backend.build(gm, "aarch64", example_inputs=torch.rand(1, 6, 6, 6))
    assert model.kernels[0].variant == "default" and "depthwise" in model.kernels[0].note
    assert "default" in model.kernel_report() and "0.0 % of MACs" in model.kernel_report()


def test_selection_bound_is_tight() -> None:
    """Pure selection: P = 4 exactly up to 2*4*span*max|w| <= 32767, then P = 2."""
    def facts(span: int, w_max: int) -> LayerFacts:
        weight = np.full((2, 3, 1, 1), w_max)
        return LayerFacts("l", "conv2d", 0, span, weight, np.zeros(2, np.int64), 0, 1, 0,
                          frozenset({"avx2"}), "llvm")
    assert select_kernel(facts(255, 16)).variant == "avx2_u8s8_p4"  # 32640
    assert select_kernel(facts(255, 17)).variant == "avx2_u8s8_p2"  # 34680
    assert select_kernel(facts(129, 127)).variant == "avx2_u8s8_p1"  # 2*1*129*127 = 32766
    assert select_kernel(facts(130, 127)).variant == "avx2_s16"  # 33020
    vnni = LayerFacts("l", "conv2d", 0, 255, np.full((2, 3, 1, 1), 127), np.zeros(2, np.int64),
                      0, 1, 0, frozenset({"avx2", "avx512vnni"}), "llvm")
    assert select_kernel(vnni).variant == "avx512_vnni"


def test_negative_only_ranges_count_the_zero_padding_operand() -> None:
    """Codes in ``[-128, -1]`` shift by 128 into ``[0, 127]``, but the zero padding (code 0) is
    the operand 128: the bounds use 128, so P = 1's ``2*1*span*127 <= 32767`` fails (2*128*127
    = 32512 fits, 2*129*127 would not) exactly as for the range ``[-128, 0]``."""
    def facts(lo: int, hi: int) -> LayerFacts:
        return LayerFacts("l", "conv2d", lo, hi, np.full((2, 3, 1, 1), 127), np.zeros(2, np.int64),
                          0, 1, 0, frozenset({"avx2"}), "llvm")
    assert facts(-128, -1).span == facts(-128, 0).span == 128
    # products 128 * sum|w| (381) plus the offset correction in the bias, 128 * sum(w)
    assert facts(-128, -1).kernel_acc_bound() == facts(-128, 0).kernel_acc_bound() == 2 * 381 * 128
    assert facts(5, 200).span == 200  # a range above zero: offset 0, the padding operand 0
    assert select_kernel(facts(-128, -1)).variant == select_kernel(facts(-128, 0)).variant


#: (kind, P, output channels, output width) -> (tile_w, tile_oc): the register tile of the
#: channel-lane kernels (``conv2d.choose_tiles``; ``benchmarks/latency/tiles_ab.json``).
TILES = [
    ("ubsw", 4, 64, 28, (7, 1)),  # one block: its 4 weight vectors reused over 7 columns
    ("ubsw", 2, 64, 56, (4, 2)),  # P <= 2, 8 blocks: each broadcast feeds two blocks
    ("ubsw", 1, 23, 14, (7, 1)),  # 3 blocks: a second block per tile would pad 24 -> 32
    ("ubsw", 4, 9, 5, (5, 1)),  # a row narrower than the widest tile: the whole row
    ("wd", 1, 64, 28, (4, 2)),  # int16, 8 blocks: each broadcast pair feeds two blocks
    ("wd", 1, 40, 28, (7, 1)),  # int16, 5 blocks (odd): one block, no padded block
    ("vnni", 1, 64, 28, (7, 2)),  # 32 zmm registers: two 16-channel blocks
    ("sdot", 1, 64, 28, (4, 4)),  # 32 NEON registers, 4 int32 lanes: four blocks
]


@pytest.mark.parametrize(("kind", "p", "oc", "width", "tiles"), TILES)
def test_register_tiles_pad_no_block_of_output_channels(kind: str, p: int, oc: int,
                                                         width: int,
                                                         tiles: tuple[int, int]) -> None:
    from djpq_compiler.backends.tvm.kernels.conv2d import ConvKernelSpec, choose_tiles

    spec = ConvKernelSpec(1, 16, 3, width, oc, (3, 3), (1, 1), (1, 1), (1, 1), kind, p,
                          "uint8", 0, 0, "uint8", 0, 255)
    assert choose_tiles(spec) == tiles


def test_unsafe_group_count_is_wrong_on_worst_case() -> None:
    """The bound is real: forcing P = 4 past it saturates (so the selection's check matters)."""
    tvm = pytest.importorskip("tvm")
    from djpq_compiler.backends.tvm.kernels.conv2d import (
        ConvKernelSpec,
        build_conv_kernel,
        pack_weight,
    )

    spec = ConvKernelSpec(1, 16, 3, 3, 8, (1, 1), (1, 1), (0, 0), (1, 1), "ubsw", 4, "uint8", 0,
                          0, "int32", 0, 0)
    func, (_, tile_oc) = build_conv_kernel(spec)
    lib = tvm.compile(tvm.IRModule({"main": func}),
                      target=tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    x = np.full((1, 16, 3, 3), 255, np.uint8)
    w = np.full((8, 16, 1, 1), 31, np.int64)  # 2*4*255*31 = 63240 > 32767
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in
            (x, pack_weight(w, spec, tile_oc), np.zeros(8 * tile_oc, np.int32),
             np.zeros((1, 8, 3, 3), np.int32))]
    lib.mod["main"](*args)
    assert not np.array_equal(args[-1].numpy(), np.full((1, 8, 3, 3), 16 * 255 * 31))


@pytest.mark.parametrize(("c_in", "c_out", "groups", "batch"), [
    (16, 32, 4, 2),  # 4 groups of 4 -> 8
    (40, 24, 2, 3),  # 2 groups of 20 -> 12: each group's channels padded to whole blocks
    (64, 64, 4, 1),  # 4 groups of 16 -> 16: every block full
])
def test_grouped_conv_is_one_kernel_over_images_and_groups(c_in: int, c_out: int, groups: int,
                                                           batch: int) -> None:
    """A grouped conv is one written kernel called once, its batch the images x groups
    (``ConvKernelSpec.conv_groups``: each group with its own weights and epilogue parameters),
    scheduled and compiled once, and bit-exact (odd group widths and batch sizes included)."""
    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=4, groups=groups, seed=4)
    gm = im.trace_integer(One(layer, 8, False).eval())
    x = inputs((batch, c_in, 9, 8), 8, False)[0]
    mod, ctx = lower(gm, [x], AVX2)
    written = [gv.name_hint for gv, _ in mod.functions.items() if gv.name_hint.startswith("djpq_")]
    assert len(written) == 1 and f"{groups} groups" in ctx.kernels[0].note
    assert adapter.call_tir_count(mod) == 1
    check(layer, (batch, c_in, 9, 8), 8)


#: (groups, in per group, out per group) -> merge factor k of ``select.merge_groups`` on a CPU
#: target (the smallest divisor of the group count, at most MAX_MERGE, giving >= 4 -> 8 channels
#: per group; 1: unchanged).
#: (groups, in_g, out_g, lanes, k): ``lanes`` is the packed layout's L where the layer reads or
#: writes it (0: NCHW on both sides).
MERGES = [
    (4, 4, 8, 0, 1),  # wide enough already
    (32, 4, 4, 0, 2),  # ResNeXt-50 32x4d, first stage: 16 groups of 8 -> 8
    (32, 4, 4, 8, 2),  # the same packed on AVX2: 8 channels fill its 8 lanes
    (32, 4, 4, 16, 4),  # packed with 16 lanes (VNNI): 8 groups of 16 -> 16, 2x the narrowest
    (32, 8, 8, 16, 2),  # its second stage packed with 16 lanes: pairs
    (32, 8, 8, 8, 1),  # ... with 8 lanes: as it is
    (32, 32, 32, 16, 1),  # its last stage: 32 groups in one kernel call, no merge
    (8, 1, 2, 0, 4),  # channel multiplier 2 (not depthwise): 2 groups of 4 -> 8
    (8, 1, 2, 8, 8),  # ... packed: 1 group of 8 -> 16, 2x the narrowest, fills 8 lanes
    (3, 2, 2, 0, 1),  # 3 groups of 2 -> 2: merging all three gives 6 -> 6, still < 8 outputs
    (64, 2, 2, 0, 4),  # 64 groups of 2 -> 2: k = 2 gives 4 -> 4 (too narrow), k = 4 16 of 8 -> 8
    (4, 12, 12, 8, 2),  # 24 channels fill 8 lanes
    (2, 12, 12, 16, 1),  # no divisor of 2 groups fills 16 lanes: the narrowest (none)
    (8, 3, 8, 8, 2),  # filling 8 lanes needs k = 8, 4x the narrowest (k = 2): not taken
]


@pytest.mark.parametrize(("groups", "in_g", "out_g", "lanes", "k"), MERGES)
def test_narrow_groups_merge_block_diagonally(groups: int, in_g: int, out_g: int, lanes: int,
                                             k: int) -> None:
    """Pure selection: narrow or numerous groups are merged ``k`` at a time into block-diagonal
    groups (each original group's weights at its own input channels, zeros elsewhere), so every
    output's weights and ``sum|w|`` are the same; in the packed layout further, up to twice the
    narrowest merge's work, to fill whole lane blocks."""
    from djpq_compiler.backends.tvm.kernels.select import merge_groups

    rng = np.random.default_rng(groups)
    weight = rng.integers(-7, 8, (groups * out_g, in_g, 3, 3))
    facts = LayerFacts("l", "conv2d", 0, 255, weight, np.zeros(groups * out_g, np.int64), 0,
                       groups, 0, frozenset({"avx2"}), "llvm")
    merged, got = merge_groups(facts, lanes)
    assert got == k
    if k == 1:
        assert merged is facts
        return
    assert merged.groups == groups // k and merged.weight.shape == (groups * out_g, k * in_g, 3, 3)
    for g in range(groups):
        rows = slice(g * out_g, (g + 1) * out_g)
        block = merged.weight[rows]
        j = g % k
        assert np.array_equal(block[:, j * in_g:(j + 1) * in_g], weight[rows])
        assert not np.delete(block, np.s_[j * in_g:(j + 1) * in_g], axis=1).any()
    assert select_kernel(merged).kind is not None


def test_cuda_runs_numerous_groups_in_one_kernel_like_the_cpu() -> None:
    """CUDA's dp4a kernel runs every group in one call, as the CPU kernels do: 32 groups of
    32 -> 32 are not merged on either, 32 groups of 4 -> 4 are merged in pairs on both."""
    from djpq_compiler.backends.tvm.kernels.select import merge_groups

    for width, k in ((32, 1), (4, 2)):
        weight = np.ones((32 * width, width, 3, 3), np.int64)
        facts = [LayerFacts("l", "conv2d", 0, 255, weight, np.zeros(32 * width, np.int64), 0,
                            32, 0, features, "t") for features in (frozenset({"dp4a"}),
                                                                   frozenset({"avx2"}))]
        assert [merge_groups(f)[1] for f in facts] == [k, k]
        cuda = select_kernel(merge_groups(facts[0])[0])
        assert cuda.variant == "cuda_dp4a" and f"{32 // k} groups in one kernel" in cuda.note


def test_resnext_like_grouped_conv_merges_groups_and_stays_exact() -> None:
    """32 groups of 4 -> 4 channels (ResNeXt's first stage, narrower than the grouped kernels
    take) get written kernels on block-diagonal pairs of groups, bit-exact; 3 groups of 2 -> 2,
    which no merge within MAX_MERGE widens enough, keep TVM's generic lowering."""
    layer = int_layer("conv", 128, 128, x_bits=8, w_bits=4, groups=32, seed=5)
    _, records = check(layer, (2, 128, 6, 7), 8)
    assert records[0].variant.startswith("avx2_u8s8")
    assert "32 groups of 4 -> 4 channels merged 2 at a time into 16" in records[0].note
    narrow = int_layer("conv", 6, 6, x_bits=8, w_bits=4, groups=3, seed=6)
    _, records = check(narrow, (2, 6, 6, 7), 8)
    assert records[0].variant == "default" and "groups=3" in records[0].note


#: (batch, channels in -> out, spatial, kernel, depthwise, runs parallel): the thread rule of
#: ``conv2d.runs_parallel`` as a table. Batch-1 layers of the reference nets (under a million
#: MACs) run on the calling thread; their batch-32 layers and resnet18-size layers go parallel;
#: a MAC-light 1x1 stride-2 shortcut at batch 32 counts its outputs' epilogue work.
PARALLEL_RULE = [
    (1, 16, 16, 28, 3, False, False),  # resnet20 stage 1, batch 1: 1.8 M MACs
    (32, 16, 16, 28, 3, False, True),  # the same at batch 32: 58 M MACs
    (1, 96, 96, 14, 3, True, False),  # a mobilenetv2 depthwise layer, batch 1
    (32, 96, 96, 14, 3, True, True),  # ... at batch 32 (outputs dominate)
    (1, 64, 64, 56, 3, False, True),  # resnet18 at 224, batch 1: 116 M MACs
    (32, 13, 32, 28, 1, False, True),  # resnet20's stride-2 shortcut at batch 32 (2.5 M MACs)
]


@pytest.mark.parametrize(("batch", "cin", "cout", "hw", "k", "dw", "parallel"), PARALLEL_RULE)
def test_small_kernels_run_on_the_calling_thread(batch: int, cin: int, cout: int, hw: int,
                                                 k: int, dw: bool, parallel: bool) -> None:
    """Small kernels have no parallel loop (each call would wake the thread pool for less work
    than the wake-up costs); large ones keep theirs."""
    pytest.importorskip("tvm")
    from djpq_compiler.backends.tvm.kernels.conv2d import (
        ConvKernelSpec,
        build_conv_kernel,
        runs_parallel,
    )

    stride = 2 if k == 1 else 1
    spec = ConvKernelSpec(batch, cin, hw, hw, cout, (k, k), (stride, stride), (k // 2, k // 2),
                          (1, 1), "dw8" if dw else "ubsw", 1, "uint8", 0, 0, "int8", -127, 127,
                          in_lanes=8, out_lanes=8)
    assert runs_parallel(spec) is parallel
    func, _ = build_conv_kernel(spec)
    assert ("T.parallel" in func.script()) is parallel

"""Layout planning of the TVM backend (``backends/tvm/layout.py``): packed ``NCHW{L}c`` values
between written conv kernels and lane-wise integer ops, bit-exact against the integer reference
with pruned odd channel counts (1 channel included), batch 1 and 32, residual and depthwise
chains, a float island, concat, a kernel falling back to the default lowering mid-chain, and model
outputs taken from the middle of a packed chain; padding lanes proven never to reach an output."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.ir import (
    add_rescale,
    concat_rescales,
)
from djpq_compiler.ir import modules as im
from djpq_compiler.testing.int_layers import int_layer
from djpq_compiler.workflows.report import kernel_rows

pytest.importorskip("tvm")
from djpq_compiler.backends.tvm import adapter  # noqa: E402
from djpq_compiler.backends.tvm.build import target_spec  # noqa: E402
from djpq_compiler.backends.tvm.emit import lower  # noqa: E402
from djpq_compiler.backends.tvm.kernels.emit import target_features  # noqa: E402
from djpq_compiler.backends.tvm.kernels.report import kernel_table  # noqa: E402
from djpq_compiler.backends.tvm.kernels.select import LayerFacts, select_kernel  # noqa: E402
from djpq_compiler.backends.tvm.layout import (  # noqa: E402
    NCHW,
    Layout,
    layout_lanes,
    packed_channel_const,
    plan_layouts,
)

AVX2 = {"kind": "llvm", "mcpu": "haswell"}  # 8 lanes
VNNI = {"kind": "llvm", "mcpu": "cascadelake"}  # 16 lanes
HOST_FEATURES = target_features(target_spec("x86")[0]) or frozenset()
needs_avx512 = pytest.mark.skipif("avx512vnni" not in HOST_FEATURES,
                                  reason="this CPU has no AVX512-VNNI")
TARGETS = [pytest.param(AVX2, id="avx2"), pytest.param(VNNI, id="vnni", marks=needs_avx512)]


#: The integer conv of these tests: a pruned layer whose output codes spread like its input's.
conv = functools.partial(int_layer, "conv", bias_bound=300, spread_codes=True)


def add(s_a: float, s_b: float, s_out: float) -> im.IntAdd:
    return im.IntAdd(add_rescale(s_a, s_b, s_out), (s_a, s_b, s_out), 8, False)


class Chain(nn.Module):
    """conv -> relu -> conv -> residual add -> depthwise (stride 2) -> 1x1 to ONE channel ->
    conv; the residual sum is also a model output (taken from the middle of the packed chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(3, 13, 0.02, 0.05, seed=1)
        self.relu = im.IntClip(0, 200)
        self.c2 = conv(13, 13, 0.05, 0.05, seed=2)
        self.add = add(0.05, 0.05, 0.06)
        self.dw = conv(13, 13, 0.06, 0.04, groups=13, stride=2, seed=3)
        self.c3 = conv(13, 1, 0.04, 0.04, k=1, seed=4)
        self.c4 = conv(1, 5, 0.04, 0.04, seed=5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.relu(self.c1(self.quant(x)))
        s = self.add(a, self.c2(a))
        return self.c4(self.c3(self.dw(s))), s


class ResNetLike(nn.Module):
    """resnet20-like: stem, an identity block, a stride-2 block with a 1x1 shortcut, average
    pool, linear (pruned odd widths 7 and 11)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.stem = conv(1, 7, 0.02, 0.05, seed=10)
        self.b1a, self.b1b = conv(7, 7, 0.05, 0.05, seed=11), conv(7, 7, 0.05, 0.05, seed=12)
        self.add1, self.relu1 = add(0.05, 0.05, 0.05), im.IntClip(0, 255)
        self.b2a = conv(7, 11, 0.05, 0.05, stride=2, seed=13)
        self.b2b = conv(11, 11, 0.05, 0.05, seed=14)
        self.short = conv(7, 11, 0.05, 0.05, k=1, stride=2, seed=15)
        self.add2, self.relu2 = add(0.05, 0.05, 0.07), im.IntClip(0, 255)
        self.gap = im.IntAdaptiveAvgPool2d(1)
        self.fc = im.IntLinear(weight=torch.randint(-7, 8, (4, 11)), bias=torch.zeros(4),
                               w_scale=torch.full((4,), 0.02, dtype=torch.float64),
                               in_scale=0.07, w_bits=4, out_scale=None, out_bits=8,
                               out_signed=True, clip=None, m=torch.ones(4), shift=torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(self.quant(x))
        a = self.relu1(self.add1(a, self.b1b(self.b1a(a))))
        b = self.relu2(self.add2(self.short(a), self.b2b(self.b2a(a))))
        return self.fc(torch.flatten(self.gap(b), 1))


class MobileNetLike(nn.Module):
    """mobilenetv2-like inverted residuals: 1x1 expand, depthwise, 1x1 project, residual add;
    then a stride-2 block with a requantize between the expansion and the depthwise."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.stem = conv(1, 5, 0.02, 0.05, seed=20)
        self.exp1 = conv(5, 19, 0.05, 0.05, k=1, seed=21)
        self.dw1 = conv(19, 19, 0.05, 0.05, groups=19, seed=22)
        self.proj1 = conv(19, 5, 0.05, 0.05, k=1, seed=23)
        self.add1 = add(0.05, 0.05, 0.05)
        self.exp2 = conv(5, 17, 0.05, 0.05, k=1, seed=24)
        self.req = im.Requantize(0.05, 0.06, 8, False)
        self.dw2 = conv(17, 17, 0.06, 0.05, groups=17, stride=2, seed=25)
        self.proj2 = conv(17, 3, 0.05, 0.05, k=1, seed=26)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(self.quant(x))
        a = self.add1(a, self.proj1(self.dw1(self.exp1(a))))
        return self.proj2(self.dw2(self.req(self.exp2(a))))


class Island(nn.Module):
    """A float island mid-chain, a concat, a max pool, and a 16-bit layer that falls back to the
    default lowering between packed kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(3, 9, 0.02, 0.05, seed=30)
        self.deq, self.req = im.Dequantize(0.05), im.Quantize(0.04, 8, False)
        self.c2 = conv(9, 6, 0.04, 0.05, seed=31)
        self.c3 = conv(9, 3, 0.05, 0.05, seed=32)
        self.cat = im.IntConcat(concat_rescales([0.05, 0.05], 0.05), [0.05, 0.05], 0.05, 8,
                                False, 1)
        self.pool = im.IntMaxPool2d((2, 2), (2, 2), (0, 0), (1, 1), False)
        self.wide = conv(9, 10, 0.05, 0.001, out_bits=16, seed=33)
        self.c4 = conv(10, 7, 0.001, 0.05, x_bits=16, seed=34)
        self.c5 = conv(7, 2, 0.05, 0.05, seed=35)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(self.quant(x))
        b = self.c2(self.req(self.deq(a) * 1.25))  # float island
        c = self.pool(self.cat(b, self.c3(a)))
        return self.c5(self.c4(self.wide(c)))


class VggLike(nn.Module):
    """vgg7-like: conv pairs with max pools between them (packed pools), flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1, self.c2 = conv(1, 9, 0.02, 0.05, seed=40), conv(9, 11, 0.05, 0.05, seed=41)
        self.pool1 = im.IntMaxPool2d((2, 2), (2, 2), (0, 0), (1, 1), False)
        self.c3 = conv(11, 21, 0.05, 0.05, seed=42)
        self.pool2 = im.IntMaxPool2d((3, 3), (2, 2), (1, 1), (1, 1), True)
        self.fc = im.IntLinear(weight=torch.randint(-7, 8, (4, 21 * 9)), bias=torch.zeros(4),
                               w_scale=torch.full((4,), 0.02, dtype=torch.float64),
                               in_scale=0.05, w_bits=4, out_scale=None, out_bits=8,
                               out_signed=True, clip=None, m=torch.ones(4), shift=torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pool1(self.c2(self.c1(self.quant(x))))
        return self.fc(torch.flatten(self.pool2(self.c3(a)), 1))


class Mixed(nn.Module):
    """An add of a packed value (c1, also read by the conv c2) and an NCHW one (a grouped conv
    with 1 input channel per group: the default lowering): the add must unpack."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(3, 6, 0.02, 0.05, seed=50)
        self.grouped = conv(3, 6, 0.02, 0.05, groups=3, seed=51)
        self.c2 = conv(6, 5, 0.05, 0.05, seed=52)
        self.add = add(0.05, 0.05, 0.05)
        self.c3 = conv(6, 4, 0.05, 0.05, seed=53)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.quant(x)
        a = self.c1(q)
        return self.c2(a), self.c3(self.add(a, self.grouped(q)))


class Pools(nn.Module):
    """Average pools on packed values (odd pruned widths 13, 11, 7): a strided padded
    ``ceil_mode`` pool without padding counts, an uneven pool fused with its requantization, a
    global pool + requantize before a flatten, and an adaptive pool to 1x1 fused with its
    requantization as a second output."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(3, 13, 0.02, 0.05, seed=60)
        self.avg = im.IntAvgPool2d((3, 3), (2, 2), (1, 1), True, False, None)
        self.c2 = conv(13, 11, 0.05, 0.05, seed=61)
        self.uneven = im.IntPoolRequantize(im.IntAvgPool2d((2, 2), (2, 2), (0, 0), True, True,
                                                           None),
                                           (6, 5), 0.05, 8, False, 0.04, 8, False)
        self.c3 = conv(11, 7, 0.04, 0.05, seed=62)
        self.gap = im.IntAvgPool2d((3, 3), (3, 3), (0, 0), False, True, None)
        self.rq = im.Requantize(0.05, 0.03, 8, False)
        self.adaptive = im.IntPoolRequantize(im.IntAdaptiveAvgPool2d(1), (3, 3), 0.05, 8, False,
                                             0.02, 8, False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.c3(self.uneven(self.c2(self.avg(self.c1(self.quant(x))))))
        return torch.flatten(self.rq(self.gap(a)), 1), torch.flatten(self.adaptive(a), 1)


def run_both(gm: torch.fx.GraphModule, x: torch.Tensor, spec: dict) -> tuple[list, object]:
    """Lower for ``spec``, compile, run on ``x``; the outputs (as int64 where integer) and ctx."""
    mod, ctx = lower(gm, [x], spec)
    vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(spec)))
    outs = [torch.from_numpy(o) for o in adapter.run_vm(vm, [x.numpy()])]
    return [o.to(torch.int64) if k == "int" else o
            for o, k in zip(outs, ctx.output_kinds, strict=True)], ctx


def assert_exact(net: nn.Module, shape: tuple[int, ...], spec: dict) -> object:
    gm = im.trace_integer(net.eval())
    x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0])) * 5.0
    got, ctx = run_both(gm, x, spec)
    want = gm(x)
    want = list(want) if isinstance(want, tuple) else [want]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g, w.to(g.dtype)), (g - w).abs().max()
    assert any(len(torch.unique(w)) > 3 for w in want)  # not everything clipped
    return ctx


# ----------------------------------------------------------------------------- the plan


def test_layout_facts() -> None:
    assert str(NCHW) == "NCHW" and not NCHW.packed
    packed = Layout(16, 13)
    assert str(packed) == "NCHW16c" and packed.blocks == 1 and Layout(8, 17).blocks == 3
    assert layout_lanes(None) == 0 and layout_lanes(frozenset({"dotprod"})) == 0
    assert layout_lanes(frozenset({"avx2"})) == 8
    assert layout_lanes(frozenset({"avx2", "avx512bw", "avx512vnni"})) == 16


def test_packed_channel_constants() -> None:
    """Per-channel constants of lane-wise ops on packed values: channel c at block c // L, lane
    c % L; padding lanes 0."""
    const = packed_channel_const(np.arange(1, 11), Layout(8, 10))
    assert const.shape == (1, 2, 1, 1, 8)
    assert const[0, 1, 0, 0].tolist() == [9, 10, 0, 0, 0, 0, 0, 0]
    assert const[0, 0, 0, 0].tolist() == list(range(1, 9))


def test_fit_groups_to_lanes() -> None:
    """P is lowered only as far as a packed block needs, and the record says so."""
    from djpq_compiler.backends.tvm.kernels.select import fit_groups_to_lanes

    facts = LayerFacts("l", "conv2d", 0, 255, np.full((3, 5, 1, 1), 7), np.zeros(3), 0, 1, 15,
                       frozenset({"avx2"}), "llvm mcpu=haswell")
    p4 = select_kernel(facts)
    assert p4.variant == "avx2_u8s8_p4"
    p2 = fit_groups_to_lanes(p4, facts, 8)
    assert p2.variant == "avx2_u8s8_p2" and "2*2*255*7 = 7140 <= 32767" in p2.bound
    assert "lowered from 4" in p2.note
    assert fit_groups_to_lanes(p4, facts, 16) is p4


def test_plan_is_pure_and_golden() -> None:
    """Convs and lane-wise ops between them are packed; a value whose only users cannot read
    packed values (c4 -> output) is not; lane-wise ops after a non-candidate input are not."""
    gm = im.trace_integer(Chain().eval())
    plan = plan_layouts(gm, 16)
    assert plan.packed == {"c1", "relu", "c2", "add", "dw", "c3"}
    assert plan_layouts(gm, 0).packed == frozenset()
    island = plan_layouts(im.trace_integer(Island().eval()), 8)
    # c1 feeds the island (float) and c3; c2/c3 feed the concat (unpacked); wide -> c4 -> c5
    assert island.packed == {"c1", "wide", "c4"}


# ------------------------------------------------------------------- bit-exact networks


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
def test_chain_bit_exact_with_middle_output(spec: dict, batch: int) -> None:
    ctx = assert_exact(Chain(), (batch, 3, 11, 9), spec)
    lanes = layout_lanes(target_features(spec))
    layouts = {k.layer: (k.in_layout, k.out_layout) for k in ctx.kernels}
    packed = f"NCHW{lanes}c"
    assert layouts == {"c1": ("NCHW", packed), "c2": (packed, packed), "dw": (packed, packed),
                       "c3": (packed, packed), "c4": (packed, "NCHW")}
    assert f"NCHW -> {packed}" in kernel_table(ctx.kernels)
    rows = kernel_rows(ctx.kernels)  # the demo report's rows carry the layouts too
    assert [r.layout for r in rows][:2] == [f"NCHW -> {packed}", f"{packed} -> {packed}"]


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
def test_resnet_like_bit_exact(spec: dict, batch: int) -> None:
    ctx = assert_exact(ResNetLike(), (batch, 1, 12, 12), spec)
    # the last block's sum feeds the global average pool, which reads it packed: only the
    # pooled value is unpacked (for the flatten), so every conv writes packed
    unpacked = {k.layer for k in ctx.kernels if k.out_layout == "NCHW"}
    assert unpacked == {"fc"}


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
def test_mobilenet_like_bit_exact(spec: dict, batch: int) -> None:
    ctx = assert_exact(MobileNetLike(), (batch, 1, 10, 10), spec)
    outs = [k.out_layout for k in ctx.kernels]
    assert outs[-1] == "NCHW" and all(o != "NCHW" for o in outs[:-1])
    variants = {k.layer: k.variant for k in ctx.kernels}
    # 1x1 convs on packed u8 input: with 8 lanes, P = 4 (16 channels) is lowered to P = 2 so
    # that the kernel reads the NCHW8c blocks directly; exact (the bound shrinks with P)
    one_by_one = {"exp1", "proj1", "exp2", "proj2"}
    want = "avx2_u8s8_p2" if spec is AVX2 else "avx512_vnni"
    assert {variants[name] for name in one_by_one} == {want}


class StridedOneByOne(nn.Module):
    """conv -> 1x1 stride 1 -> 1x1 stride 2 -> conv, on packed 32-channel values."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(1, 32, 0.02, 0.05, seed=81)
        self.s1 = conv(32, 32, 0.05, 0.05, k=1, padding=0, seed=82)
        self.s2 = conv(32, 64, 0.05, 0.05, k=1, stride=2, padding=0, seed=83)
        self.c2 = conv(64, 5, 0.05, 0.04, seed=84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.s2(self.s1(self.c1(self.quant(x)))))


@pytest.mark.parametrize("batch", [1, 32])
def test_only_stride_one_1x1_lowers_p_to_read_packed_input(batch: int) -> None:
    """On AVX2 a stride-1 1x1 on packed u8 input lowers P to 2 and reads the NCHW8c blocks
    directly; a stride-2 one keeps P = 4 behind a pack stage (measured faster: its direct read
    uses every other pixel of each block row). Both bit-exact and both packed in and out."""
    ctx = assert_exact(StridedOneByOne(), (batch, 1, 12, 10), AVX2)
    got = {k.layer: (k.variant, k.in_layout, k.out_layout) for k in ctx.kernels}
    assert got["s1"] == ("avx2_u8s8_p2", "NCHW8c", "NCHW8c")
    assert got["s2"] == ("avx2_u8s8_p4", "NCHW8c", "NCHW8c")


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
def test_vgg_like_packed_max_pools_bit_exact(spec: dict, batch: int) -> None:
    ctx = assert_exact(VggLike(), (batch, 1, 10, 10), spec)
    layouts = {k.layer: (k.in_layout, k.out_layout) for k in ctx.kernels}
    # pool1 stayed packed between c2 and c3; pool2 only feeds the flatten: c3 writes NCHW
    assert layouts["c2"][1] != "NCHW" and layouts["c3"] == (layouts["c2"][1], "NCHW")
    assert layouts["fc"] == ("NCHW", "NCHW")


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
def test_float_island_concat_pool_and_fallback_bit_exact(spec: dict, batch: int) -> None:
    ctx = assert_exact(Island(), (batch, 3, 10, 8), spec)
    variants = {k.layer: k.variant for k in ctx.kernels}
    assert variants["c4"] == "default"  # 16-bit codes: no written kernel
    layouts = {k.layer: (k.in_layout, k.out_layout) for k in ctx.kernels}
    # wide was planned packed (its consumer c4 is a conv) and writes it; the default c4 reads
    # it unpacked and writes NCHW
    assert layouts["wide"][1] != "NCHW" and layouts["c4"] == ("NCHW", "NCHW")
    assert layouts["c2"] == ("NCHW", "NCHW") and layouts["c3"][1] == "NCHW"


class Grouped(nn.Module):
    """conv -> grouped conv (4 groups of 8 -> 8) -> conv -> grouped 1x1 conv (8 groups of 4 -> 3)
    -> conv (ResNeXt-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(3, 32, 0.02, 0.05, seed=1)
        self.g1 = conv(32, 32, 0.05, 0.05, groups=4, seed=2)
        self.c2 = conv(32, 32, 0.05, 0.05, seed=3)
        self.g2 = conv(32, 24, 0.05, 0.05, groups=8, k=1, padding=0, seed=4)
        self.c3 = conv(24, 5, 0.05, 0.04, seed=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.g2(self.c2(self.g1(self.c1(self.quant(x))))))


#: lanes -> layer -> (in, out layout, how the groups ran): with 8 lanes g1's groups fill whole
#: blocks as they are, and g2's 4 -> 3 groups, which the kernels need merged four at a time
#: (16 -> 12, not whole blocks), merge all eight (32 -> 24: twice the narrowest merge's work) to
#: stay packed; with 16 lanes g1's groups merge in pairs (16 -> 16) to stay packed, and no
#: merge within twice the work makes g2's whole blocks (32 -> 24): it runs NCHW, and so do its
#: neighbours' sides that meet it.
GROUPED_LAYOUTS = {
    8: {"c1": ("NCHW", "NCHW8c", None), "g1": ("NCHW8c", "NCHW8c", "4 groups in one kernel"),
        "c2": ("NCHW8c", "NCHW8c", None), "g2": ("NCHW8c", "NCHW8c", "merged 8 at a time into 1"),
        "c3": ("NCHW8c", "NCHW", None)},
    16: {"c1": ("NCHW", "NCHW16c", None), "g1": ("NCHW16c", "NCHW16c", "merged 2 at a time into 2"),
         "c2": ("NCHW16c", "NCHW", None), "g2": ("NCHW", "NCHW", "merged 4 at a time into 2"),
         "c3": ("NCHW", "NCHW", None)},
}


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 3])
def test_grouped_convs_read_and_write_packed_blocks_bit_exact(spec: dict, batch: int) -> None:
    """A grouped conv whose (merged) groups fill whole lane blocks reads and writes the packed
    layout (its input and output are the images x groups batch, the same memory); groups are
    merged further to fill them where that at most doubles the work; otherwise NCHW."""
    ctx = assert_exact(Grouped(), (batch, 3, 9, 10), spec)
    got = {k.layer: (k.in_layout, k.out_layout, k.note) for k in ctx.kernels}
    want = GROUPED_LAYOUTS[layout_lanes(target_features(spec))]
    assert {layer: g[:2] for layer, g in got.items()} == {layer: w[:2] for layer, w in want.items()}
    for layer, (_, _, how) in want.items():
        assert how is None or how in got[layer][2], (layer, got[layer][2])


class GroupedBetween(nn.Module):
    """conv -> grouped conv (k x k, stride s, 4 groups of 8 -> 16) -> conv, or with a float
    output (``out_scale`` None) as the last layer."""

    def __init__(self, k: int, stride: int, float_out: bool, out_signed: bool) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(3, 32, 0.02, 0.05, out_signed=out_signed, seed=1)
        self.g = conv(32, 64, 0.05, None if float_out else 0.05, groups=4, k=k, stride=stride,
                      padding=k // 2, seed=2)
        self.c2 = None if float_out else conv(64, 5, 0.05, 0.04, seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g(self.c1(self.quant(x)))
        return y if self.c2 is None else self.c2(y)


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("k", "stride", "float_out", "signed"), [
    (1, 1, False, False),  # a 1x1 reading its packed input directly (no pack stage)
    (1, 2, False, True),  # strided 1x1 on signed codes (offset, corrected in the bias)
    (3, 2, False, False),
    (3, 1, True, False),  # float output: the int32 accumulator and the float finish
])
def test_grouped_kernel_geometries_bit_exact(spec: dict, k: int, stride: int, float_out: bool,
                                             signed: bool) -> None:
    """The one-kernel grouped conv (images x groups as the batch) is exact at 1x1 and 3x3,
    strides 1 and 2, on signed input codes and with a float output, on AVX2 and VNNI."""
    ctx = assert_exact(GroupedBetween(k, stride, float_out, signed), (2, 3, 10, 9), spec)
    record = next(r for r in ctx.kernels if r.layer == "g")
    # packed unless its output is float (NCHW: then c1 writes NCHW too); with 16 lanes packed,
    # the 8-channel input groups merge in pairs (16 -> 32) to fill whole blocks
    lanes = 0 if float_out else layout_lanes(target_features(spec))
    groups = "2 groups in one kernel" if lanes == 16 else "4 groups in one kernel"
    assert record.variant != "default" and groups in record.note
    assert (lanes == 16) == ("merged 2 at a time" in record.note)
    assert record.in_layout == (f"NCHW{lanes}c" if lanes else "NCHW")


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
def test_average_pools_read_packed_values_bit_exact(spec: dict, batch: int) -> None:
    """Every average pool reads its producer's packed output (the convs before them all write
    packed) and stays bit-exact: padded, ceil_mode and uneven windows, global and adaptive."""
    ctx = assert_exact(Pools(), (batch, 3, 11, 9), spec)
    packed = f"NCHW{layout_lanes(target_features(spec))}c"
    layouts = {k.layer: (k.in_layout, k.out_layout) for k in ctx.kernels}
    assert layouts == {"c1": ("NCHW", packed), "c2": (packed, packed), "c3": (packed, packed)}


def test_pool_layout_rules() -> None:
    """Average pools (and adaptive ones to 1x1) are "reducing": a conv before one writes packed
    even though the pool's users unpack; other adaptive pools have no packed form."""

    class Net(nn.Module):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.quant = im.Quantize(0.02, 8, False)
            self.c1 = conv(3, 5, 0.02, 0.05, seed=70)
            self.pool = im.IntAdaptiveAvgPool2d(size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.c1(self.quant(x)))

    assert plan_layouts(im.trace_integer(Net(1).eval()), 8).packed == {"c1"}
    assert plan_layouts(im.trace_integer(Net(2).eval()), 8).packed == frozenset()
    # pools feeding convs are packed values themselves; gap/adaptive only feed flattens
    plan = plan_layouts(im.trace_integer(Pools().eval()), 16)
    assert plan.packed == {"c1", "avg", "c2", "uneven", "c3"}


@pytest.mark.parametrize("spec", TARGETS)
def test_mixed_layouts_unpack_before_a_lanewise_op(spec: dict) -> None:
    ctx = assert_exact(Mixed(), (2, 3, 7, 9), spec)
    layouts = {k.layer: (k.in_layout, k.out_layout) for k in ctx.kernels}
    assert layouts["c1"][1] != "NCHW" and layouts["c2"][0] == layouts["c1"][1]
    assert layouts["grouped"] == ("NCHW", "NCHW") and layouts["c3"][0] == "NCHW"


# -------------------------------------------------------------------------- padding lanes


@pytest.mark.parametrize(("kind", "groups", "lanes", "k"), [
    ("vnni", 1, 16, 3), ("ubsw", 4, 8, 3), ("ubsw", 2, 8, 3), ("dw16", 1, 16, 3),
    ("dw8", 1, 8, 3), ("vnni", 1, 16, 1), ("ubsw", 2, 8, 1), ("ubsw", 1, 8, 1)])
def test_padding_lanes_are_never_read(kind: str, groups: int, lanes: int, k: int) -> None:
    """A kernel reading a packed input gives the same result whatever the padding lanes hold
    (here the largest code, everywhere), equal to the NCHW kernel on the real channels; its
    packed output's padding lanes hold defined codes (``clip(0)``), and its real lanes equal the
    NCHW output. The 1x1 cases read the packed input directly, and the 3x3 ones whose lane
    blocks hold whole intrinsic groups (vnni, ubsw P = 2) pack whole blocks: no per-lane mask
    there, the padding lanes meet zero weights."""
    if kind in ("vnni", "dw16") and "avx512vnni" not in HOST_FEATURES:
        pytest.skip("this CPU has no AVX512-VNNI")
    tvm = pytest.importorskip("tvm")
    from djpq_compiler.backends.tvm.kernels.conv2d import (
        ConvKernelSpec,
        build_conv_kernel,
        direct_input_shape,
        pack_weight,
        packs_blocks,
        reads_directly,
    )

    c, oc = 5, (5 if kind.startswith("dw") else 3)
    nchw = ConvKernelSpec(2, c, 6, 7, oc, (k, k), (1, 1), (k // 2, k // 2), (1, 1), kind, groups,
                          "uint8", 0, 0, "int8", -128, 127, "int32")
    packed = dataclasses.replace(nchw, in_lanes=lanes, out_lanes=lanes)
    gen = np.random.default_rng(0)
    x = gen.integers(0, 256, (2, c, 6, 7)).astype(np.uint8)
    weight = gen.integers(-7, 8, (oc, 1 if kind.startswith("dw") else c, k, k))
    x_packed = np.full((2, 1, 6, 7, lanes), 255, np.uint8)  # padding lanes: the largest code
    x_packed[:, 0, :, :, :c] = x.transpose(0, 2, 3, 1)
    results = []
    cases = ((nchw, x, (2, oc, 6, 7)), (packed, x_packed, (2, 1, 6, 7, lanes)))
    for spec, data, out_shape in cases:
        func, (tile_w, tile_oc) = build_conv_kernel(spec)
        if spec.in_lanes:
            assert reads_directly(spec, tile_w) == (k == 1)
            dense = not kind.startswith("dw")
            assert packs_blocks(spec) == (dense and lanes % (4 * groups) == 0)
            if k == 1:
                data = data.reshape(direct_input_shape(spec))
        size = spec.out_blocks(tile_oc) * spec.oc_lanes
        lib = tvm.compile(tvm.IRModule({"main": func}),
                          target=tvm.target.Target(VNNI if "16" in kind or kind == "vnni"
                                                   else AVX2))
        w_dtype = "int16" if spec.depthwise else "int8"
        vec = np.zeros(size, np.int64)
        vec[:oc] = 1
        args = [data, pack_weight(weight, spec, tile_oc).astype(w_dtype),
                np.zeros(size, np.int32), vec.astype(np.int32) * 3, np.zeros(size, np.int64),
                (vec * 4).astype(np.int64), np.zeros(out_shape, np.int8)]
        dev = tvm.cpu()
        tensors = [tvm.runtime.tensor(a, dev) for a in args]
        lib.mod["main"](*tensors)
        results.append(tensors[-1].numpy())
    want, got = results
    np.testing.assert_array_equal(got[:, 0, :, :, :oc].transpose(0, 3, 1, 2), want)
    assert (got[:, 0, :, :, oc:] == 0).all()  # padding lanes: clip(0) with zero multipliers
    assert len(np.unique(want)) > 3

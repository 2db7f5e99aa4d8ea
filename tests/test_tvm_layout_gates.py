"""Packed forms of ``IntMul`` (a squeeze-excite gate broadcast over ``H, W``) and ``IntConcat``
(block-aligned channel offsets) in the TVM backend (``backends/tvm/layout.py``): planned packed,
bit-exact against the integer reference with odd pruned channel counts at batch 1 and 32, and
with the largest code (255) in the padding lanes of their packed inputs."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import fx, nn

from djpq_compiler.ir import concat_rescales
from djpq_compiler.ir import modules as im
from djpq_compiler.ir.lookup import IntLUT
from djpq_compiler.testing.int_layers import int_layer

pytest.importorskip("tvm")
from djpq_compiler.backends.tvm import adapter  # noqa: E402
from djpq_compiler.backends.tvm.adapter import Builder  # noqa: E402
from djpq_compiler.backends.tvm.build import target_spec  # noqa: E402
from djpq_compiler.backends.tvm.converters import convert_concat, convert_mul  # noqa: E402
from djpq_compiler.backends.tvm.emit import IntValue, Lowering, lower  # noqa: E402
from djpq_compiler.backends.tvm.float_ops import convert_lut  # noqa: E402
from djpq_compiler.backends.tvm.kernels.emit import target_features  # noqa: E402
from djpq_compiler.backends.tvm.layout import Layout, layout_lanes, plan_layouts  # noqa: E402

AVX2 = {"kind": "llvm", "mcpu": "haswell"}  # 8 lanes
VNNI = {"kind": "llvm", "mcpu": "cascadelake"}  # 16 lanes
HOST_FEATURES = target_features(target_spec("x86")[0]) or frozenset()
needs_avx512 = pytest.mark.skipif("avx512vnni" not in HOST_FEATURES,
                                  reason="this CPU has no AVX512-VNNI")
TARGETS = [pytest.param(AVX2, id="avx2"), pytest.param(VNNI, id="vnni", marks=needs_avx512)]

conv = functools.partial(int_layer, "conv", bias_bound=300, spread_codes=True)


def gate_table() -> IntLUT:
    """A hardsigmoid-like table on 8-bit codes."""
    codes = torch.arange(256)
    return IntLUT(torch.clamp(codes // 2 + 40, 0, 255), "hardsigmoid", 0.05, 8, False,
                  1 / 255, 8, False)


class SqueezeExcite(nn.Module):
    """conv (13 channels) -> global pool -> 1x1 (5) -> ReLU -> 1x1 (13) -> [table] -> gate;
    ``x * gate`` -> conv. With ``table`` the gate comes out of an ``IntLUT`` (NCHW, packed
    for the product), else straight from the 1x1 conv (packed, broadcast over ``H, W``)."""

    def __init__(self, table: bool) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(3, 13, 0.02, 0.05, seed=90)
        self.pool = im.IntAdaptiveAvgPool2d(1)
        self.f1 = conv(13, 5, 0.05, 0.05, k=1, seed=91)
        self.relu = im.IntClip(0, 255)
        self.f2 = conv(5, 13, 0.05, 0.05, k=1, seed=92)
        self.table = gate_table() if table else None
        self.mul = im.IntMul((0.05, 1 / 255, 0.04), 8, False)
        self.c2 = conv(13, 7, 0.04, 0.05, seed=93)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(self.quant(x))
        gate = self.f2(self.relu(self.f1(self.pool(a))))
        if self.table is not None:
            gate = self.table(gate)
        return self.c2(self.mul(a, gate))


class SignedSqueeze(nn.Module):
    """conv -> global pool -> 1x1 to 4 *signed* channels -> [table] -> 1x1 (one packed block,
    one pixel per image: the expand conv packs it with the +128 offset, batch-outer at batch
    >= 2) -> the product with the conv's output."""

    def __init__(self, table: bool) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = conv(3, 13, 0.02, 0.05, seed=94)
        self.pool = im.IntAdaptiveAvgPool2d(1)
        self.f1 = conv(13, 4, 0.05, 0.05, k=1, out_signed=True, seed=95)
        self.table = IntLUT(torch.arange(-127, 128) // 3, "tanh", 0.05, 8, True, 0.05, 8,
                            True) if table else None
        self.f2 = conv(4, 13, 0.05, 1 / 255, k=1, seed=96)
        self.mul = im.IntMul((0.05, 1 / 255, 0.04), 8, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(self.quant(x))
        s = self.f1(self.pool(a))
        if self.table is not None:
            s = self.table(s)
        return self.mul(a, self.f2(s))


class Concat(nn.Module):
    """A concat of a 16-channel conv and a 5-channel one (rescaled), then a conv; ``aligned``
    puts the 16 channels first (block-aligned offsets for 8 and 16 lanes)."""

    def __init__(self, aligned: bool) -> None:
        super().__init__()
        self.aligned = aligned
        self.quant = im.Quantize(0.02, 8, False)
        self.wide = conv(3, 16, 0.02, 0.05, seed=100)
        self.narrow = conv(3, 5, 0.02, 0.04, seed=101)
        scales = [0.05, 0.04] if aligned else [0.04, 0.05]
        self.cat = im.IntConcat(concat_rescales(scales, 0.05), scales, 0.05, 8, False, 1)
        self.c3 = conv(21, 6, 0.05, 0.05, seed=102)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quant(x)
        a, b = self.wide(q), self.narrow(q)
        return self.c3(self.cat(a, b) if self.aligned else self.cat(b, a))


def assert_exact(net: nn.Module, shape: tuple[int, ...], spec: dict) -> Lowering:
    gm = im.trace_integer(net.eval())
    x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0])) * 5.0
    mod, ctx = lower(gm, [x], spec)
    vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(spec)))
    (got,) = adapter.run_vm(vm, [x.numpy()])
    want = gm(x)
    assert torch.equal(torch.from_numpy(got).to(torch.int64), want)
    assert len(torch.unique(want)) > 3
    return ctx


def test_plan_packs_the_product_and_the_aligned_concat() -> None:
    """The gated product is packed whatever its gate; its producer c1 writes packed; a concat
    is planned packed only with block-aligned channel offsets."""
    plan = plan_layouts(im.trace_integer(SqueezeExcite(table=True).eval()), 16)
    assert {"c1", "f2", "table", "mul"} <= plan.packed  # a table lookup is lane-wise
    plan = plan_layouts(im.trace_integer(SqueezeExcite(table=False).eval()), 16)
    assert {"c1", "f2", "mul"} <= plan.packed
    assert {"wide", "narrow", "cat"} <= plan_layouts(im.trace_integer(Concat(True).eval()),
                                                     8).packed
    misaligned = plan_layouts(im.trace_integer(Concat(False).eval()), 8).packed
    assert not {"wide", "narrow", "cat"} & misaligned


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("table", [True, False], ids=["lut_gate", "conv_gate"])
def test_squeeze_excite_product_stays_packed(spec: dict, batch: int, table: bool) -> None:
    ctx = assert_exact(SqueezeExcite(table), (batch, 3, 9, 7), spec)
    packed = f"NCHW{layout_lanes(target_features(spec))}c"
    layouts = {k.layer: (k.in_layout, k.out_layout) for k in ctx.kernels}
    assert layouts["c1"][1] == packed and layouts["c2"][0] == packed  # x * gate: no unpack


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 2, 32])
@pytest.mark.parametrize("table", [True, False], ids=["lut", "direct"])
def test_signed_squeeze_one_block_one_pixel(spec: dict, batch: int, table: bool) -> None:
    """The expand conv of a squeeze-excite reads a packed signed 4-channel value at 1x1
    (through a table or straight from the squeeze conv); bit-exact at every batch."""
    ctx = assert_exact(SignedSqueeze(table), (batch, 3, 9, 7), spec)
    packed = f"NCHW{layout_lanes(target_features(spec))}c"
    layouts = {k.layer: (k.in_layout, k.out_layout) for k in ctx.kernels}
    assert layouts["f2"][0] == packed


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_concat_on_channel_blocks(spec: dict, batch: int, aligned: bool) -> None:
    ctx = assert_exact(Concat(aligned), (batch, 3, 7, 9), spec)
    packed = f"NCHW{layout_lanes(target_features(spec))}c"
    layouts = {k.layer: (k.in_layout, k.out_layout) for k in ctx.kernels}
    assert layouts["c3"][0] == (packed if aligned else "NCHW")


# -------------------------------------------------------------------------- padding lanes


def _graph(module: nn.Module, inputs: int) -> tuple[fx.GraphModule, list[fx.Node], fx.Node]:
    graph = fx.Graph()
    root = nn.Module()
    root.op = module
    args = [graph.placeholder(f"x{i}") for i in range(inputs)]
    node = graph.call_module("op", tuple(args))
    graph.output(node)
    return fx.GraphModule(root, graph), args, node


def _run_one(module: nn.Module, converter: object, values: list[tuple[np.ndarray, Layout]],
             ranges: list[tuple[int, int]], spec: dict) -> tuple[np.ndarray, Layout]:
    """Lower one op whose inputs are given packed (or NCHW) arrays; run it."""
    gm, args, node = _graph(module, len(values))
    bb = Builder()
    ctx = Lowering(gm, bb, spec)
    params = [bb.var(f"x{i}", a.shape, str(a.dtype)) for i, (a, _) in enumerate(values)]
    with bb.function("main", params):
        with bb.dataflow():
            for arg, param, (_, layout), (lo, hi) in zip(args, params, values, ranges,
                                                         strict=True):
                ctx.env[arg] = IntValue(param, lo, hi, layout)
            out = converter(ctx, node)  # type: ignore[operator]
            result = bb.emit_output([bb.astype(out.expr, "int64")])
        mod = bb.finish(result)
    vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(spec)))
    (got,) = adapter.run_vm(vm, [a for a, _ in values])
    return got, out.layout


def _packed(x: np.ndarray, lanes: int) -> np.ndarray:
    """NCHW codes -> ``[N, CB, H, W, L]`` with 255 in every padding lane."""
    n, c, h, w = x.shape
    blocks = -(-c // lanes)
    out = np.full((n, blocks * lanes, h, w), 255, x.dtype)
    out[:, :c] = x
    return np.ascontiguousarray(out.reshape(n, blocks, lanes, h, w).transpose(0, 1, 3, 4, 2))


def _unpacked(x: np.ndarray, channels: int) -> np.ndarray:
    n, cb, h, w, lanes = x.shape
    return x.transpose(0, 1, 4, 2, 3).reshape(n, cb * lanes, h, w)[:, :channels]


@pytest.mark.parametrize("spec", TARGETS)
def test_gated_product_with_255_in_padding_lanes(spec: dict) -> None:
    """Real lanes equal the reference whatever the padding lanes hold; output padding lanes
    hold codes of the result's range."""
    lanes = layout_lanes(target_features(spec))
    gen = np.random.default_rng(5)
    x = gen.integers(0, 256, (3, 13, 4, 5)).astype(np.uint8)
    gate = gen.integers(0, 256, (3, 13, 1, 1)).astype(np.uint8)
    module = im.IntMul((0.05, 1 / 255, 0.04), 8, False)
    for order in (0, 1):  # x * gate and gate * x
        values = [(_packed(x, lanes), Layout(lanes, 13)), (gate, Layout())]
        values = values if order == 0 else values[::-1]
        got, layout = _run_one(module, convert_mul, values, [(0, 255), (0, 255)], spec)
        assert layout == Layout(lanes, 13)
        want = module(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(
            gate.astype(np.int64))).numpy()
        np.testing.assert_array_equal(_unpacked(got, 13), want)
        assert got.min() >= module.qmin and got.max() <= module.qmax


@pytest.mark.parametrize("spec", TARGETS)
def test_aligned_concat_with_255_in_padding_lanes(spec: dict) -> None:
    lanes = layout_lanes(target_features(spec))
    gen = np.random.default_rng(6)
    a = gen.integers(0, 256, (2, lanes, 3, 5)).astype(np.uint8)
    b = gen.integers(0, 256, (2, 5, 3, 5)).astype(np.uint8)
    module = im.IntConcat(concat_rescales([0.05, 0.04], 0.05), [0.05, 0.04], 0.05, 8, False, 1)
    values = [(_packed(a, lanes), Layout(lanes, lanes)), (_packed(b, lanes), Layout(lanes, 5))]
    got, layout = _run_one(module, convert_concat, values, [(0, 255), (0, 255)], spec)
    assert layout == Layout(lanes, lanes + 5)
    want = module(*(torch.from_numpy(v.astype(np.int64)) for v in (a, b))).numpy()
    np.testing.assert_array_equal(_unpacked(got, lanes + 5), want)
    assert got.max() <= 255


@pytest.mark.parametrize("spec", TARGETS)
def test_lookup_table_with_255_in_padding_lanes(spec: dict) -> None:
    """A table on 4-bit codes reads packed values; the padding lanes' 255 would index far past
    its 16 entries: the clipped index keeps every lane inside the table, real lanes exact."""
    lanes = layout_lanes(target_features(spec))
    table = IntLUT((torch.arange(16) * 7) % 13 - 6, "tanh", 0.1, 4, False, 0.05, 4, True)
    x = np.random.default_rng(8).integers(0, 16, (2, 11, 3, 4)).astype(np.uint8)
    got, layout = _run_one(table, convert_lut, [(_packed(x, lanes), Layout(lanes, 11))],
                           [(0, 15)], spec)
    assert layout == Layout(lanes, 11)
    want = table(torch.from_numpy(x.astype(np.int64))).numpy()
    np.testing.assert_array_equal(_unpacked(got, 11), want)
    assert got.min() >= table.qmin and got.max() <= table.qmax  # padding lanes too


def test_misaligned_concat_unpacks() -> None:
    """An input before the last with a partial block: the concat reads NCHW (no wrong offsets)."""
    gen = np.random.default_rng(7)
    a, b = (gen.integers(0, 256, (1, c, 2, 2)).astype(np.uint8) for c in (5, 8))
    module = im.IntConcat([None, None], [0.05, 0.05], 0.05, 8, False, 1)
    values = [(_packed(a, 8), Layout(8, 5)), (_packed(b, 8), Layout(8, 8))]
    got, layout = _run_one(module, convert_concat, values, [(0, 255), (0, 255)], AVX2)
    assert layout == Layout()
    np.testing.assert_array_equal(got, np.concatenate([a, b], 1))
    assert got.shape == (1, 13, 2, 2)

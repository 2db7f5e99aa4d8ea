"""Fused lane-wise integer chains (``backends/tvm/kernels/eltwise.py``): the int32 forms of a
requantization are exact on the whole code range (or refused), the written chain kernel is
bit-exact against the reference arithmetic (int32 and int64 steps, odd sizes, packed values with
out-of-range padding lanes), the table form equals the reference on every code combination and
is chosen only where it was measured faster, and residual-block tails in a network fuse into one
kernel each, bit-exact at batch 1 and 32 with odd pruned channel counts."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.ir import add_rescale
from djpq_compiler.ir import modules as im
from djpq_compiler.testing.int_layers import int_layer

pytest.importorskip("tvm")
from djpq_compiler.backends.tvm import adapter  # noqa: E402
from djpq_compiler.backends.tvm.build import target_spec  # noqa: E402
from djpq_compiler.backends.tvm.emit import lower  # noqa: E402
from djpq_compiler.backends.tvm.kernels.eltwise import (  # noqa: E402
    INT32_MAX,
    TABLE_L1_BYTES,
    TABLE_MAX_BYTES,
    Clamp,
    Expr,
    Leaf,
    Requant,
    Sum,
    build_chain_kernel,
    build_table_kernel,
    chain_form,
    chain_steps,
    eltwise_table,
    reference_eval,
    split_multiplier,
    table_layout,
    tabulate,
    value_range,
)
from djpq_compiler.backends.tvm.kernels.emit import target_features  # noqa: E402

AVX2 = {"kind": "llvm", "mcpu": "haswell"}  # 8 lanes
VNNI = {"kind": "llvm", "mcpu": "cascadelake"}  # 16 lanes
HOST_FEATURES = target_features(target_spec("x86")[0]) or frozenset()
needs_avx512 = pytest.mark.skipif("avx512vnni" not in HOST_FEATURES,
                                  reason="this CPU has no AVX512-VNNI")
TARGETS = [pytest.param(AVX2, id="avx2"), pytest.param(VNNI, id="vnni", marks=needs_avx512)]

conv = functools.partial(int_layer, "conv", bias_bound=300, spread_codes=True)


def _split_eval(q: np.ndarray, lo: int, hi: int, m: int, shift: int) -> np.ndarray | None:
    split = split_multiplier(lo, hi, m, shift)
    if split is None:
        return None
    assert split.bound <= INT32_MAX
    out = q * split.mh + split.add
    if split.correction:
        out = out + ((q * split.ml) >> split.u)
    assert np.abs(out).max() <= INT32_MAX
    return out >> split.shift


# ------------------------------------------------------------------- int32 requantization


@pytest.mark.parametrize("seed", range(6))
def test_split_multiplier_is_exact_on_the_whole_range(seed: int) -> None:
    """Every int32 form equals ``(q*m + 2^(s-1)) >> s`` for every code of its range (unclipped:
    the correction term is dropped only where the exhaustive check allows it)."""
    gen = np.random.default_rng(seed)
    found = 0
    for _ in range(200):
        bits = int(gen.integers(2, 17))
        lo = -int(gen.integers(0, 2 ** (bits - 1) + 1)) if gen.random() < 0.5 else 0
        hi = int(gen.integers(1, 2**bits))
        m, shift = int(gen.integers(2**20, 2**31)), int(gen.integers(0, 46))
        q = np.arange(lo, hi + 1, dtype=np.int64)
        got = _split_eval(q, lo, hi, m, shift)
        if got is not None:
            found += 1
            np.testing.assert_array_equal(got, (q * m + ((1 << shift) >> 1)) >> shift)
    assert found > 50


def test_split_multiplier_bounds_and_refusal() -> None:
    # a power-of-two multiplier needs no correction term: a << 19 (IntAdd's larger operand)
    split = split_multiplier(-255, 255, 2**30, 11)
    assert split is not None and not split.correction and split.mh << split.u == 2**30
    # IntAdd's final rescale of a 2^28-wide sum by a 25-bit multiplier: int64 only
    assert split_multiplier(-(2**28), 2**28, 25249605, 43) is None
    # 16-bit codes times a 31-bit multiplier with a small shift: no split fits int32
    assert split_multiplier(0, 65535, 2**31 - 1, 3) is None


def test_clipped_requantize_drops_its_correction_only_where_checked() -> None:
    """With the op's clip, the correction may be dropped after the exhaustive check; the clipped
    result then still equals the reference on every code."""
    lo, hi, m, shift, qmin, qmax = 0, 255, 1179936262, 32, 0, 15
    split = split_multiplier(lo, hi, m, shift, qmin, qmax)
    assert split is not None and not split.correction and "checked all 256" in split.why
    q = np.arange(lo, hi + 1, dtype=np.int64)
    want = np.clip((q * m + (1 << 31)) >> 32, qmin, qmax)
    np.testing.assert_array_equal(np.clip((q * split.mh + split.add) >> split.shift, qmin, qmax),
                                  want)


# ---------------------------------------------------------------------- the chain kernel


def resnet_tail(c: Leaf, p: Leaf) -> Requant:
    """resnet20's block tail: shortcut requantize, IntAdd, ReLU, requantize (real numbers)."""
    short = Requant(p, 1841263068, 30, 0, 255)
    params = add_rescale(0.05, 0.04, 0.07)
    total = Sum(Requant(c, params.a_m, params.a_shift), Requant(short, params.b_m, params.b_shift))
    added = Requant(total, params.out_m, params.out_shift, -255, 255)
    return Requant(Clamp(added, 0, 255), 1179936262, 32, 0, 15)


def run_kernel(tree: Expr, inputs: list[np.ndarray], out_dtype: str, spec: dict) -> np.ndarray:
    tvm = pytest.importorskip("tvm")
    shape = inputs[0].shape
    target = adapter.make_target(spec)
    func = build_chain_kernel(tree, shape, out_dtype, target)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    args.append(tvm.runtime.tensor(np.zeros(shape, out_dtype), dev))
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 5, 7), (2, 1, 7, 7, 16), (32, 2, 3, 4, 8)])
def test_resnet_tail_kernel_bit_exact(spec: dict, shape: tuple[int, ...]) -> None:
    """Random codes and the range ends at odd and packed shapes; the steps say which
    requantizations ran in int32."""
    tree = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, 0, 15, "uint8"))
    gen = np.random.default_rng(len(shape))
    c = gen.integers(-255, 256, shape).astype(np.int16)
    p = gen.integers(0, 16, shape).astype(np.uint8)
    c.flat[:2], p.flat[:2] = np.array([-255, 255])[:c.size], np.array([0, 15])[:c.size]
    got = run_kernel(tree, [c, p], "uint8", spec)
    np.testing.assert_array_equal(got, reference_eval(tree, [c, p]))
    steps = chain_steps(tree)
    assert len(steps) == 5 and sum(" int64" in s for s in steps) == 1  # IntAdd's final rescale
    assert "int64" in steps[3] and value_range(tree) == (0, 15)


@pytest.mark.parametrize("spec", TARGETS)
def test_every_code_pair_bit_exact(spec: dict) -> None:
    tree = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, 0, 15, "uint8"))
    c, p = np.meshgrid(np.arange(-255, 256), np.arange(16), indexing="ij")
    c, p = c.astype(np.int16), p.astype(np.uint8)
    np.testing.assert_array_equal(run_kernel(tree, [c, p], "uint8", spec),
                                  reference_eval(tree, [c, p]))


@pytest.mark.parametrize("spec", TARGETS)
def test_wide_codes_take_int64_steps_and_stay_exact(spec: dict) -> None:
    """int32-container codes of 2^24: no int32 split fits, the requantizations run in int64."""
    leaf = Leaf(0, -(2**24), 2**24, "int32")
    tree = Clamp(Requant(leaf, 2**31 - 5, 20, -(2**20), 2**20), -1000, 1000)
    assert "int64" in chain_steps(tree)[0]
    x = np.random.default_rng(1).integers(-(2**24), 2**24 + 1, (9, 111)).astype(np.int32)
    np.testing.assert_array_equal(run_kernel(tree, [x], "int16", spec),
                                  reference_eval(tree, [x]))


@pytest.mark.parametrize("spec", TARGETS)
def test_padding_lanes_do_not_reach_real_lanes(spec: dict) -> None:
    """A packed ``[N, CB, H, W, L]`` value whose padding lanes hold 255 (out of the leaf's range):
    real lanes are exact (the kernel is lane-wise) and every output lane is a code of the result's
    range (the chain ends in a clip)."""
    lanes, channels = (16, 13) if spec is VNNI else (8, 5)
    tree = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, 0, 15, "uint8"))
    gen = np.random.default_rng(2)
    shape = (2, 1, 3, 5, lanes)
    c = gen.integers(-255, 256, shape).astype(np.int16)
    p = gen.integers(0, 16, shape).astype(np.uint8)
    c[..., channels:], p[..., channels:] = 255, 255
    got = run_kernel(tree, [c, p], "uint8", spec)
    want = reference_eval(tree, [c[..., :channels], p[..., :channels]])
    np.testing.assert_array_equal(got[..., :channels], want)
    assert got.min() >= 0 and got.max() <= 15


# ------------------------------------------------------------------------------ tables


def run_table_kernel(tree: Expr, inputs: list[np.ndarray], out_dtype: str,
                     spec: dict) -> np.ndarray:
    tvm = pytest.importorskip("tvm")
    shape = inputs[0].shape
    target = adapter.make_target(spec)
    lib = tvm.compile(tvm.IRModule({"main": build_table_kernel(tree, shape, out_dtype, target)}),
                      target=target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    args.append(tvm.runtime.tensor(tabulate(tree, out_dtype), dev))
    args.append(tvm.runtime.tensor(np.zeros(shape, out_dtype), dev))
    lib["main"](*args)
    return args[-1].numpy()


def test_table_layout_and_contents_follow_the_leaves() -> None:
    """Row-major over the leaves by index (the last leaf fastest); each entry is the reference
    result of its code combination."""
    tree = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, 0, 15, "uint8"))
    entries, strides = table_layout(tree)
    assert (entries, strides) == (511 * 16, (16, 1))
    table = tabulate(tree, "uint8")
    assert table.dtype == np.uint8 and table.shape == (entries + 3,)  # a 4-byte gather's pad
    assert tabulate(tree, "int16").shape == (entries + 1,) and not tabulate(tree, "int16")[-1]
    for c, p in [(-255, 0), (-255, 15), (0, 7), (37, 3), (255, 15)]:
        want = reference_eval(tree, [np.array([c]), np.array([p])])[0]
        assert table[(c + 255) * 16 + p] == want
    with pytest.raises(ValueError, match="do not fit int8"):
        tabulate(Requant(Leaf(0, 0, 255, "uint8"), 1, 0), "int8")


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("shape", "gather"), [((1022, 8), True), ((511, 16), True),
                                               ((16, 511), False), ((8176,), True)])
@pytest.mark.parametrize("out_dtype", ["uint8", "int16", "int32"])
def test_table_kernel_bit_exact_on_every_code_combination(spec: dict, shape: tuple[int, ...],
                                                          gather: bool, out_dtype: str) -> None:
    """Whole 8-lane rows take the gather (any result container up to 32 bits); an odd
    innermost extent the scalar lookup; both equal the reference on all 511 x 16 codes."""
    from djpq_compiler.backends.tvm.kernels.eltwise import uses_gather

    tree = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, 0, 15, "uint8"))
    assert uses_gather(tree, shape, out_dtype, adapter.make_target(spec)) is gather
    c, p = np.meshgrid(np.arange(-255, 256), np.arange(16), indexing="ij")
    c, p = c.astype(np.int16).reshape(shape), p.astype(np.uint8).reshape(shape)
    np.testing.assert_array_equal(run_table_kernel(tree, [c, p], out_dtype, spec),
                                  reference_eval(tree, [c, p]))


def test_gather_kernel_machine_code_gathers() -> None:
    """On AVX2 the two-leaf lookup is ``vpgatherdd`` in the machine code, not per-lane loads;
    a three-leaf chain (scalar path) has none."""
    tvm = pytest.importorskip("tvm")
    target = adapter.make_target(AVX2)
    tree = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, 0, 15, "uint8"))
    func = build_table_kernel(tree, (4, 2, 3, 5, 8), "uint8", target)
    assert "vpgatherdd" in tvm.compile(tvm.IRModule({"main": func}),
                                       target=target).mod.inspect_source("asm")
    three = Requant(Sum(Sum(Leaf(0, 0, 3, "uint8"), Leaf(1, 0, 3, "uint8")),
                        Leaf(2, 0, 3, "uint8")), 1, 0)
    func = build_table_kernel(three, (4, 8), "uint8", target)
    assert "vpgatherdd" not in tvm.compile(tvm.IRModule({"main": func}),
                                           target=target).mod.inspect_source("asm")


@pytest.mark.parametrize("spec", TARGETS)
def test_table_kernel_keeps_out_of_range_codes_inside_the_table(spec: dict) -> None:
    """Padding lanes of a packed value may hold any code of the container (here the extremes
    of int16 and uint8, far outside the leaves' ranges): the lookup clamps each code into its
    leaf's range, so real lanes stay exact and every output is a code of the result's range."""
    tree = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, 0, 15, "uint8"))
    gen = np.random.default_rng(4)
    shape = (3, 2, 5, 7, 8)
    c = gen.integers(-255, 256, shape).astype(np.int16)
    p = gen.integers(0, 16, shape).astype(np.uint8)
    c[..., 5:7], p[..., 5:7] = -32768, 255
    c[..., 7], p[..., 7] = 32767, 16
    got = run_table_kernel(tree, [c, p], "uint8", spec)
    want = reference_eval(tree, [c[..., :5], p[..., :5]])
    np.testing.assert_array_equal(got[..., :5], want)
    lo, hi = value_range(tree)
    assert got.min() >= lo and got.max() <= hi
    # a clamped code looks up the range end's entry
    np.testing.assert_array_equal(got[..., 7], reference_eval(tree, [np.full(shape[:-1], 255),
                                                                     np.full(shape[:-1], 15)]))


def test_a_three_leaf_chain_tabulates_exactly() -> None:
    """Strides of three leaves (codes of odd ranges, one signed)."""
    a, b, c = Leaf(0, -3, 4, "int8"), Leaf(1, 0, 6, "uint8"), Leaf(2, 2, 12, "uint8")
    tree = Requant(Sum(Sum(Requant(a, 3 << 20, 21), b), Requant(c, 5 << 18, 19)), 7 << 25, 27,
                   0, 63)
    assert table_layout(tree) == (8 * 7 * 11, (77, 11, 1))
    grids = np.meshgrid(np.arange(-3, 5), np.arange(7), np.arange(2, 13), indexing="ij")
    x = [g.astype(d).reshape(-1, 4) for g, d in zip(grids, ("int8", "uint8", "uint8"),
                                                    strict=True)]
    np.testing.assert_array_equal(run_table_kernel(tree, x, "uint8", AVX2),
                                  reference_eval(tree, x))


#: (chain, output container, target emulates int64 lanes, lookup is a gather, expected form):
#: the selection rule of ``chain_form`` as a table. Where int64 is emulated a two-leaf tail is a
#: table, gathered or not, and so is a one-leaf chain with an int64 step; a one-leaf int32
#: requantization stays arithmetic and a table above TABLE_MAX_BYTES never is one. Where int64
#: lanes multiply natively only a gathered, L1-sized table is taken.
TAIL = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, 0, 15, "uint8"))  # 8,176 entries
WIDE_TAIL = resnet_tail(Leaf(0, -255, 255, "int16"), Leaf(1, -255, 255, "int16"))  # 261,121
HUGE_PAIR = Requant(Sum(Leaf(0, -4095, 4095, "int16"), Leaf(1, -4095, 4095, "int16")), 3, 2)
ONE_LEAF_INT32 = Requant(Leaf(0, 0, 25039, "uint16"), 1367816774, 35, 0, 255)
ONE_LEAF_INT64 = Requant(Leaf(0, 0, 65535, "uint16"), 2**31 - 1, 3, 0, 32767)  # no int32 split
FORMS = [
    (TAIL, "uint8", True, True, "table"),
    (TAIL, "uint8", True, False, "table"),
    (TAIL, "uint8", False, True, "table"),
    (TAIL, "uint8", False, False, "int64"),
    (WIDE_TAIL, "uint8", True, True, "table"),
    (WIDE_TAIL, "uint8", False, True, "int64"),
    (HUGE_PAIR, "int16", True, True, "int32"),
    (ONE_LEAF_INT32, "uint8", True, False, "int32"),
    (ONE_LEAF_INT64, "int16", True, False, "table"),
    (ONE_LEAF_INT64, "int16", False, False, "int64"),
]


@pytest.mark.parametrize(("tree", "out_dtype", "int32", "gather", "form"), FORMS)
def test_chain_form_selection(tree: Expr, out_dtype: str, int32: bool, gather: bool,
                              form: str) -> None:
    assert chain_form(tree, out_dtype, int32, gather) == form
    nbytes = table_layout(tree)[0] * np.dtype(out_dtype).itemsize
    if form == "table":
        assert nbytes <= (TABLE_MAX_BYTES if int32 else TABLE_L1_BYTES)


# ------------------------------------------------------------------------- in a network


def add(s_a: float, s_b: float, s_out: float, clip: tuple[int, int] | None = None) -> im.IntAdd:
    return im.IntAdd(add_rescale(s_a, s_b, s_out), (s_a, s_b, s_out), 9, True, clip)


class Blocks(nn.Module):
    """Two resnet20 block tails (odd pruned width 13): ``Requantize(shortcut) -> IntAdd ->
    IntClip -> Requantize``, the second block's shortcut reading the first block's output; a
    requantize with two users (not deferred); a broadcasting add of a per-channel gate (read in
    NCHW, emitted as Relax ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.stem = conv(1, 13, 0.02, 0.05, out_bits=5, seed=80)
        self.c1 = conv(13, 13, 0.05, 0.05, x_bits=5, out_bits=9, out_signed=True, seed=81)
        self.short1 = im.Requantize(0.05, 0.03, 8, False)
        self.add1, self.relu1 = add(0.05, 0.03, 0.04), im.IntClip(0, 255)
        self.rq1 = im.Requantize(0.04, 0.06, 4, False)
        self.c2 = conv(13, 13, 0.06, 0.05, x_bits=4, out_bits=9, out_signed=True, seed=82)
        self.short2 = im.Requantize(0.06, 0.05, 8, False)
        self.add2, self.relu2 = add(0.05, 0.05, 0.05), im.IntClip(0, 255)
        self.rq2 = im.Requantize(0.05, 0.05, 8, False)
        self.pool = im.IntAdaptiveAvgPool2d(1)
        self.gate_add = add(0.05, 0.05, 0.05, (-255, 255))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stem(self.quant(x))
        a = self.rq1(self.relu1(self.add1(self.c1(s), self.short1(s))))
        b = self.rq2(self.relu2(self.add2(self.c2(a), self.short2(a))))
        return b, self.gate_add(b, self.pool(b))


def assert_exact(net: nn.Module, shape: tuple[int, ...], spec: dict) -> object:
    gm = im.trace_integer(net.eval())
    x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0])) * 5.0
    mod, ctx = lower(gm, [x], spec)
    vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(spec)))
    got = [torch.from_numpy(o).to(torch.int64) for o in adapter.run_vm(vm, [x.numpy()])]
    want = gm(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g, w), (g - w).abs().max()
        assert len(torch.unique(w)) > 3  # not everything clipped
    return ctx


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("batch", [1, 32])
def test_block_tails_fuse_into_one_kernel_each(spec: dict, batch: int) -> None:
    ctx = assert_exact(Blocks(), (batch, 1, 9, 11), spec)
    fused = {r.ops: r for r in ctx.eltwise}  # type: ignore[attr-defined]
    first = ("short1", "add1", "relu1", "rq1")
    assert first in fused and fused[first].layout.startswith("NCHW") and "c" in fused[first].layout
    # rq2 has two users (the output and the pool / the gate add): a chain end, not deferred
    assert ("short2", "add2", "relu2", "rq2") in fused
    assert all("gate_add" not in ops for ops in fused)  # broadcasting: Relax ops
    table = eltwise_table(ctx.eltwise)  # type: ignore[attr-defined]
    # both two-leaf tails are gathered from L1-sized tables, on AVX2 and on AVX-512
    assert all(r.table for r in fused.values()) and "2 of 2 chains as tables" in table
    assert "table: 16,352 entries (511 x 32 codes)" in table


def test_no_target_keeps_the_relax_ops() -> None:
    """Without a target (TVM's generic lowering) nothing is fused or deferred; still exact."""
    gm = im.trace_integer(Blocks().eval())
    x = torch.rand((2, 1, 9, 11), generator=torch.Generator().manual_seed(3)) * 5.0
    mod, ctx = lower(gm, [x], None)
    assert ctx.eltwise == []
    vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(AVX2)))
    got = [torch.from_numpy(o).to(torch.int64) for o in adapter.run_vm(vm, [x.numpy()])]
    for g, w in zip(got, gm(x), strict=True):
        assert torch.equal(g, w)


def test_build_report_lists_the_fused_chains() -> None:
    """``build(...).kernel_report()`` shows each fused chain after the conv table, with how it
    is computed (here: a table, and its size); the built model stays bit-exact."""
    from djpq_compiler.backends.tvm import build

    gm = im.trace_integer(Blocks().eval())
    x = torch.rand((2, 1, 9, 11), generator=torch.Generator().manual_seed(5)) * 5.0
    model = build(gm, "x86", example_inputs=x)
    for g, w in zip(model(x), gm(x), strict=True):
        assert torch.equal(g, w)
    assert [r.ops for r in model.eltwise][:1] == [("short1", "add1", "relu1", "rq1")]
    report = model.kernel_report()
    assert "ops: short1, add1, relu1, rq1" in report
    assert "2 of 2 chains as tables" in report and "table: 16,352 entries" in report
    assert report.index("ops: short1") > report.index(model.kernels[0].variant)


def test_a_negative_multiplier_is_refused_not_mis_bounded() -> None:
    """The chain's range and int32 proofs assume a non-decreasing step: a negative multiplier
    (never produced by convert) is an error, not a silently wrong bound."""
    from djpq_compiler.errors import BackendError

    with pytest.raises(BackendError, match="multiplier -3"):
        Requant(Leaf(0, 0, 255, "uint8"), -3, 4)

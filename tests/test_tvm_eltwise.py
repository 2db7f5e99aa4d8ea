"""Fused lane-wise integer chains (``backends/tvm/kernels/eltwise.py``): the int32 forms of a
requantization are exact on the whole code range (or refused), the written chain kernel is
bit-exact against the reference arithmetic (int32 and int64 steps, odd sizes, packed values with
out-of-range padding lanes), and residual-block tails in a network fuse into one kernel each,
bit-exact at batch 1 and 32 with odd pruned channel counts."""

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
    Clamp,
    Expr,
    Leaf,
    Requant,
    Sum,
    build_chain_kernel,
    chain_steps,
    eltwise_table,
    reference_eval,
    split_multiplier,
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
    assert "requantizations in int32" in eltwise_table(ctx.eltwise)  # type: ignore[attr-defined]


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
    """``build(...).kernel_report()`` shows each fused chain after the conv table, with the
    arithmetic of its steps; the built model stays bit-exact."""
    from djpq_compiler.backends.tvm import build

    gm = im.trace_integer(Blocks().eval())
    x = torch.rand((2, 1, 9, 11), generator=torch.Generator().manual_seed(5)) * 5.0
    model = build(gm, "x86", example_inputs=x)
    for g, w in zip(model(x), gm(x), strict=True):
        assert torch.equal(g, w)
    assert [r.ops for r in model.eltwise][:1] == [("short1", "add1", "relu1", "rq1")]
    report = model.kernel_report()
    assert "ops: short1, add1, relu1, rq1" in report
    assert "requantizations in int32" in report
    assert report.index("ops: short1") > report.index(model.kernels[0].variant)


def test_a_negative_multiplier_is_refused_not_mis_bounded() -> None:
    """The chain's range and int32 proofs assume a non-decreasing step: a negative multiplier
    (never produced by convert) is an error, not a silently wrong bound."""
    from djpq_compiler.errors import BackendError

    with pytest.raises(BackendError, match="multiplier -3"):
        Requant(Leaf(0, 0, 255, "uint8"), -3, 4)
